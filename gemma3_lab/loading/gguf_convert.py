"""A GGUF file as a Hugging Face folder: converted once into the user cache (config.json, float32
model.safetensors, tokenizer files), written to a temporary sibling and renamed into place."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from gemma3_lab.config.paths import cache_root
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.loading.gguf import hf_name, open_gguf, read_gguf_config, read_gguf_state_dict
from gemma3_lab.loading.gguf_tokenizer import tokenizer_from_gguf
from gemma3_lab.loading.hf import validate
from gemma3_lab.loading.hf_names import Unmatched, to_internal


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Write config.json, model.safetensors (float32) and the tokenizer files to `out_dir`.

    Everything goes to a temporary sibling first and is renamed at the end, so an interrupted
    conversion never leaves a folder that looks complete. `out_dir` must not exist (or be empty).
    """
    g = open_gguf(gguf_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # fail before the slow part
        what = "not empty" if out.is_dir() else "a file"
        raise Gemma3LabError(f"{out}: the conversion target exists and is {what}; give a new or empty folder")
    cfg = read_gguf_config(g)
    check_tensors(g, cfg)  # a GGUF whose metadata disagrees with its tensors fails here, before 1 GB is written
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{_HOST}-{os.getpid()}-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps({**cfg.to_hf(), "dtype": "float32"}, indent=2))
        save_file(read_gguf_state_dict(g, progress), tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer_from_gguf(g).save(tmp)
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp made the folder private (0700); give it the usual permissions
        for f in (tmp, *tmp.iterdir()):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        try:
            os.rename(tmp, out)  # atomic; fails if another process filled `out` meanwhile
        except OSError:
            raise FileExistsError(errno.EEXIST, "conversion target exists and is not empty", str(out)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


PARTIAL = ".partial-"  # `.NAME.partial-HOST-PID-XXXX`: who is writing it, so leftovers can be told apart
_HOST = socket.gethostname().replace("-", "_") or "host"
_STALE_S = 24 * 3600  # a partial from another machine (shared home) is only presumed dead after a day


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete conversion temporaries a killed process left in `folder`: those of this machine whose
    process is gone, and any older than a day (another machine's, or an old name without a PID)."""
    removed = []
    for p in folder.glob(f".*{PARTIAL}*"):
        m = re.fullmatch(rf"\..+{re.escape(PARTIAL)}(?:([^-]+)-(\d+)-)?[^-]*", p.name)
        if m is None or not p.is_dir():
            continue
        host, pid = m.group(1), m.group(2)
        mine_and_dead = host == _HOST and pid is not None and not _alive(int(pid))
        try:
            old = time.time() - max([p.stat().st_mtime, *(f.stat().st_mtime for f in p.iterdir())]) > _STALE_S
        except OSError:  # removed meanwhile by another process
            continue
        if mine_and_dead or old:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def check_tensors(g, cfg) -> None:
    """The GGUF's tensor names and shapes against the config its metadata describes (error names the GGUF)."""
    found, unknown = {}, []
    for name, t in g.tensors.items():
        internal = to_internal(hf_name(name) or name)
        if isinstance(internal, Unmatched):
            unknown.append(name)
        elif internal is not None:  # None: dropped on purpose
            found[internal] = (t.shape, name)
    validate(cfg, found, unknown=unknown, where=f"{g.path} (its tensors against its own metadata)")


def cached_conversion(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True) -> Path:
    """The converted folder for this GGUF, converting on first use."""
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "GGUF file not found", str(path))
    st = path.stat()
    # Keyed by name + size + mtime, not a content hash: hashing 250 MB (or 16 GB for a 27B) would
    # cost seconds on every warm call, and a changed file almost always changes size or mtime.
    out = Path(cache_dir or cache_root()) / "converted" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if out.is_dir():  # only a finished conversion is ever renamed into place
        return out
    print(f"gemma3_lab: converting {path.name} to a Hugging Face folder at {out} (once)", file=sys.stderr)
    try:
        return convert_gguf(path, out, progress)
    except FileExistsError:
        if out.is_dir():  # another process finished the same conversion first
            return out
        raise
