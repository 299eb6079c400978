"""The library's small shared helpers."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from mlx_dsvl.utils import common_prefix, file_digest, print_names


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7], [8]) == 0


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read chunk
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    assert file_digest(f) == hashlib.sha256(data).hexdigest()
    assert file_digest(f, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_print_names_writes_a_file_name_that_is_not_utf8_as_it_came(capsysbinary):
    """pytest's stdout, like a UTF-8 locale's, is strict: ``print`` raises UnicodeEncodeError."""
    print_names("wrote " + os.fsdecode(b"/tmp/caf\xe9") + " and caf\u00e9")
    assert capsysbinary.readouterr().out == b"wrote /tmp/caf\xe9 and caf\xc3\xa9\n"
