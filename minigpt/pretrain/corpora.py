"""Public corpora the demos download once, verified by sha256 and cached."""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

# The char-rnn "tiny Shakespeare" file that nanoGPT's shakespeare_char demo downloads.
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def tiny_shakespeare(timeout: float = 30.0) -> Path:
    """The path of tiny Shakespeare's input.txt, downloading it into the cache the first time.

    Raises ConnectionError when it cannot be downloaded (offline: pass --data with a local copy)
    and ValueError when the download does not have the expected sha256.
    """
    path = cache_dir() / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return path
    logger.info("downloading tiny Shakespeare from %s", TINY_SHAKESPEARE_URL)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=timeout) as response:
            data = response.read()
    except OSError as err:
        raise ConnectionError(
            f"could not download tiny Shakespeare from {TINY_SHAKESPEARE_URL} ({err}); "
            f"offline, pass --data PATH pointing at a local copy of input.txt"
        ) from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise ValueError(f"downloaded tiny Shakespeare has sha256 {digest}, expected {TINY_SHAKESPEARE_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
