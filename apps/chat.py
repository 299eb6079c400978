"""DeepSeek-VL chat in the browser, on your own machine.

    python apps/chat.py [--model ...]     # the same, with OpenBLAS preloaded on Linux's CPU backend
    streamlit run apps/chat.py                                   # deepseek-ai/deepseek-vl-1.3b-chat
    streamlit run apps/chat.py -- --model /path/to/folder-or-hub-id [--4bit] [--device gpu] [--max-tokens N]
        [--temperature T] [--top-p P] [--repetition-penalty R] [--kv-bits 4|8] [--system TEXT] [--draft-model PATH]
        (sidebar defaults)

UI only: the logic (uploads, loading, the transcript around mlx_dsvl.ChatSession) is in
chat_logic.py next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_logic as logic  # noqa: E402

from mlx_dsvl.blas import ensure_fast_blas  # noqa: E402
from mlx_dsvl.processing.chat import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from mlx_dsvl.sampling import DEFAULTS as SAMPLING_DEFAULTS  # noqa: E402
from mlx_dsvl.sampling import controls

if __name__ == "__main__" and not st.runtime.exists():
    # `python apps/chat.py [app options] [--server.port N ...]`: preload OpenBLAS on Linux's CPU
    # backend (this command re-executes itself once), then become `streamlit run` on this file
    from streamlit.web import cli as streamlit_cli

    ensure_fast_blas()
    argv = logic.launch_argv(str(Path(__file__).resolve()), sys.argv[1:])
    try:  # bad options: one line now, not a server that shows an error later
        logic.check_launch(logic.parse_args(argv[argv.index("--") + 1:], strict=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.argv = argv
    sys.exit(streamlit_cli.main())

ARGS = logic.parse_args(sys.argv[1:])
try:
    from mlx_dsvl.device import select_device

    logic.check_start_values(ARGS)  # under `streamlit run ... -- --temperature 9`
    select_device(ARGS.device)  # every script run: Streamlit runs them on worker threads
except ValueError as exc:  # --device gpu without one
    st.error(str(exc))
    st.stop()

st.set_page_config(page_title="DeepSeek-VL chat", page_icon=":material/visibility:")


@st.cache_resource(show_spinner=False, max_entries=2)
def get_model(path: str, quantize: bool, vision_bits: int | None) -> logic.LoadedModel:
    """Once per process and (path, 4-bit, vision bits): sampling and prompt widgets never reload
    the model (nor ``--draft-model``'s, loaded with the same options)."""
    return logic.load_model(path, quantize, ARGS.adapter, vision_bits, ARGS.draft_model)


# -- settings -----------------------------------------------------------------------------------
CONTROLS = controls()  # the sampling widgets: label, limits, step (mlx_dsvl.sampling)


def _start(name: str):
    given = getattr(ARGS, name)  # checked against the widget's limits above
    return type(CONTROLS[name].low)(getattr(SAMPLING_DEFAULTS, name) if given is None else given)


DEFAULTS = {
    "model_path": ARGS.model,
    "quantize": ARGS.quantize,
    "vision": {v: k for k, v in logic.VISION_OPTIONS.items()}[ARGS.quantize_vision],
    **{name: _start(name) for name in CONTROLS},
    "kv_cache": {v: k for k, v in logic.KV_CACHE_OPTIONS.items()}[ARGS.kv_bits],
    "system_prompt": DEFAULT_SYSTEM_PROMPT if ARGS.system is None else ARGS.system,
    "speculative": ARGS.draft_model is not None,
}
for k, v in DEFAULTS.items():
    st.session_state.setdefault(k, v)


def sampling() -> dict:
    s = st.session_state
    return {name: type(c.low)(s[name]) for name, c in CONTROLS.items()}


def request(action: str) -> None:
    st.session_state.action = action


with st.sidebar:
    st.button("New conversation", icon=":material/add_comment:", on_click=request, args=("new",),
              width="stretch")
    st.subheader("Model")
    st.text_input("Model folder or hub id", key="model_path")
    st.toggle("4-bit LLM", key="quantize",
              help="Quantize the language model to 4 bits (group size 64) after loading: about a "
                   "third of the memory (1.3B: 8 -> 2.4 GB on CPU). On MLX's CPU backend, prompt "
                   "processing is much slower in 4-bit.")
    st.selectbox("Vision", list(logic.VISION_OPTIONS), key="vision",
                 help="Quantize the vision towers' and the aligner's linear layers (groups of 64) after "
                      "loading: the 7B's towers take about half (8-bit) or a third (4-bit) of their "
                      "half-precision memory; the patch embeddings, SAM's neck and the norms stay.")
    st.selectbox("KV cache", list(logic.KV_CACHE_OPTIONS), key="kv_cache",
                 help="Keep the conversation's attention keys and values quantized: about half (8-bit) "
                      "or a third (4-bit) of their memory, which grows with the conversation (1.3B in "
                      "bfloat16: 0.8 GB at 4096 tokens), at a small cost in accuracy.")
    st.toggle("Speculative decoding", key="speculative",
              help=(f"The draft model {ARGS.draft_model} proposes" if ARGS.draft_model else
                    "Prompt lookup proposes: the conversation's own tokens, where its last few occurred before,")
              + " tokens that the model checks several at a time: the same reply, faster when the guesses are "
                "right (greedy replies, temperature 0).")
    st.subheader("Last reply")
    stats_slot = st.container()
    st.subheader("Sampling")
    for name, c in CONTROLS.items():  # integers in a number box, the rest on sliders
        widget = st.number_input if isinstance(c.low, int) else st.slider
        widget(c.label, c.low, c.high, step=c.step, key=name, help=c.help)
    st.text_area("System prompt", key="system_prompt", height=100, help="Empty: no system prompt.")
    for warning in (logic.address_warning(st.get_option("server.address")), logic.blas_hint()):
        if warning:
            st.warning(warning)

# -- the model ----------------------------------------------------------------------------------
path = st.session_state.model_path.strip()
key = (path, bool(st.session_state.quantize), logic.VISION_OPTIONS[st.session_state.vision])
try:
    with st.spinner(logic.loading_message(*key)):
        loaded = get_model(*key)
except Exception as e:  # noqa: BLE001 -- any reason is shown, never a traceback
    st.error(logic.load_error_message(path, e))
    st.stop()

conv = st.session_state.get("conversation")
if conv is None or conv.key != key:
    conv = logic.Conversation(loaded)
    st.session_state.conversation = conv
status = st.empty()
# A click during a reply starts this run at once; the previous run stops at its next token.
conv.wait_idle(on_wait=lambda: status.caption("Finishing the previous reply ..."))
status.empty()
conv.session.system_prompt = st.session_state.system_prompt
conv.session.set_draft(("model" if conv.session.draft_model else "ngram") if st.session_state.speculative else None)
try:  # a change empties the KV cache; the conversation stays
    conv.session.set_kv_cache(logic.KV_CACHE_OPTIONS[st.session_state.kv_cache])
except ValueError as e:  # a model whose head size the groups do not divide
    st.sidebar.warning(f"KV cache: {e}")

st.title("DeepSeek-VL chat", anchor=False)
st.caption(f"{path}{logic.quantization_label(loaded.quantized, loaded.vision_bits, ' · ')}")

prompt = st.chat_input("Ask about your images (drop them here)", key="chat_input",
                       accept_file="multiple", max_upload_size=logic.MAX_UPLOAD_MB)

# -- actions that change the history before it is drawn -----------------------------------------
action = st.session_state.pop("action", None)
pending = None  # ("send" | "regenerate", question text, attachments) for this run
if action == "new":
    conv.new()
elif action == "remove":
    conv.remove_last_turn()
elif action == "regenerate" and conv.last_question is not None:
    pending = ("regenerate", conv.last_question.text, conv.last_question.attachments)
if prompt is not None:
    attachments, errors = logic.read_uploads(prompt.files)
    if errors:
        sent = f" Your message was not sent: “{prompt.text}”" if prompt.text else ""
        for e in errors:
            conv.note_error(f"{e}.{sent}")
    else:
        pending = ("send", prompt.text, attachments)
# conv.regenerate() removes the old exchange itself, once the model is free
history = conv.history_before_last_question() if pending and pending[0] == "regenerate" else conv.turns


# -- the history --------------------------------------------------------------------------------
def show_user(text: str, attachments) -> None:
    with st.chat_message("user"):
        if attachments:
            st.image([a.thumbnail for a in attachments], caption=[a.name for a in attachments], width=160)
        if text:
            st.markdown(text)


def reply_caption(turn: logic.Turn) -> str:
    parts = [turn.stats.summary()] if turn.stats else []
    if turn.stopped:
        parts.append("stopped")
    return " · ".join(parts)


for turn in list(history):
    if turn.role == "user":
        show_user(turn.text, turn.attachments)
    elif turn.role == "assistant":
        with st.chat_message("assistant"):
            st.markdown(turn.text or "*(empty reply)*")
            st.caption(reply_caption(turn))
    elif turn.role == "error":
        with st.chat_message("assistant", avatar=":material/error:"):
            st.error(turn.text)
    else:
        st.info(turn.text)

if not conv.turns and pending is None:
    st.info("Drop one or more images on the message box (or use its paperclip), then ask about them.")

# -- a new reply --------------------------------------------------------------------------------
if pending is not None:
    kind, text, attachments = pending
    show_user(text, attachments)
    with st.chat_message("assistant"):
        body, meta = st.empty(), st.empty()
        body.markdown("*...*")
        st.button("Stop", icon=":material/stop_circle:", key="stop")  # any click interrupts the run

        def on_chunk(turn: logic.Turn) -> None:
            body.markdown(turn.text + " ▌")

        def on_wait() -> None:
            meta.caption("Waiting for another conversation's reply to finish ...")

        if kind == "regenerate":
            conv.regenerate(on_chunk=on_chunk, on_wait=on_wait, **sampling())
        else:
            conv.send(text, attachments, on_chunk=on_chunk, on_wait=on_wait, **sampling())
    st.rerun()  # draw the finished turn (and any error note) from the history

if conv.turns:
    left, right, _ = st.columns([1, 1, 2])
    left.button("Regenerate", icon=":material/refresh:", on_click=request, args=("regenerate",),
                disabled=not conv.can_regenerate, width="stretch")
    right.button("Remove last turn", icon=":material/undo:", on_click=request, args=("remove",),
                 disabled=not conv.can_regenerate, width="stretch")

with stats_slot:
    stats = conv.last_stats
    if stats is None:
        st.caption("No reply yet.")
    else:
        a, b = st.columns(2)
        a.metric("First token (s)", f"{stats.time_to_first_token:.2f}")
        b.metric("Tokens/s", f"{stats.generation_tps:.1f}")
        a.metric("Peak memory (GB)", f"{stats.peak_memory:.2f}")
        b.metric("Tokens", f"{stats.generation_tokens}")
