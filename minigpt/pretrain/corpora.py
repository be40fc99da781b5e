"""Corpora that ship inside the package, verified by sha256 every time they are read.

Only one so far: tiny Shakespeare, the main job's default (`minigpt train` with no
`--data`), so that the README's first command runs offline with nothing but the package.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"

# The char-rnn "tiny Shakespeare" file that nanoGPT's shakespeare_char demo downloads
# (provenance in corpus/README.md).
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_CHARS = 1_115_394


def tiny_shakespeare() -> Path:
    """The path of the shipped tiny Shakespeare (1,115,394 characters), after checking its sha256.

    Raises FileNotFoundError when the file is missing from the installed package and
    ValueError when its bytes are not the published file's: either way the install is
    damaged, and the message says to reinstall or to pass --data.
    """
    path = CORPUS_DIR / "tinyshakespeare.txt"
    if not path.is_file():
        raise FileNotFoundError(f"the shipped corpus {path} is missing: the minigpt install is incomplete; "
                                f"reinstall minigpt, or pass --data PATH with a text file or folder")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise ValueError(f"the shipped corpus {path} has sha256 {digest}, expected {TINY_SHAKESPEARE_SHA256} "
                         f"(the file was changed or damaged): reinstall minigpt, or pass --data PATH")
    return path
