"""Tools for tests and benchmarks: random checkpoints in the original deepseek-ai layout (the
modules), and :data:`PETS_FORMAT`, a response format whose replies repeat their keys."""

_PET = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                         "kind": {"enum": ["cat", "dog", "bird"]},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 30}},
        "required": ["name", "kind", "age"], "additionalProperties": False}
# a JSON reply that repeats its keys (four objects with the same ones): what prompt lookup drafts well
PETS_FORMAT = {"type": "json_schema", "json_schema": {"name": "pets", "strict": True, "schema": {
    "type": "object", "properties": {"pets": {"type": "array", "items": _PET, "minItems": 4, "maxItems": 4}},
    "required": ["pets"], "additionalProperties": False}}}
