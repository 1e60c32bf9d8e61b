"""The serving policy's versions, so a running ``guardit serve`` can change it (admin endpoint).

A store is a folder every process of the server reads (``$GUARDIT_POLICY_STORE``, made by
``guardit serve`` in its run folder):

- ``packs/<id>/``: each concept pack ever installed, copied in when first installed and never
  changed after: a version names packs by id, and an id always means the same pack. A pack
  recalibrated under an id already installed is refused; give it a new id.
- ``v<N>.yaml``: version N of the policies, validated before it was written, its packs pointing
  into ``packs/``.
- ``current``: the version in force, replaced atomically (written aside, then renamed).

The API server's middleware reads ``current`` before each request and switches to a new version
as a whole (tenants, packs, levels, answer checks), so a request runs under one version from
start to end; the engine reads it before each forward pass and loads the packs it does not hold
yet. Packs stay loaded in the engine after a version drops them (requests admitted before the
change still name them), which is why an id cannot change meaning.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from steering.errors import PolicyError
from steering.files import write_atomic
from steering.pack import META_FILE, TENSORS_FILE
from steering.policy import PolicyConfig

CURRENT = "current"
PACKS = "packs"


class PolicyStore:
    """One store folder: read the version in force, install a new one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._seen: tuple[int, int] | None = None  # (inode, mtime) of ``current`` when last read
        self._version = 0

    def version(self) -> int:
        """The version in force (0 before the first install); one stat per call, a read only when
        ``current`` was replaced."""
        try:
            st = (self.root / CURRENT).stat()
        except FileNotFoundError:
            return 0
        key = (st.st_ino, st.st_mtime_ns)
        if key != self._seen:
            self._version = int((self.root / CURRENT).read_text().strip())
            self._seen = key
        return self._version

    def config(self, version: int | None = None) -> PolicyConfig:
        """A version's policies (default: the one in force)."""
        v = self.version() if version is None else version
        if v < 1:
            raise PolicyError(f"policy store {self.root} has no version installed")
        return PolicyConfig.load(self.root / f"v{v}.yaml")

    def pack_dirs(self) -> dict[str, Path]:
        """Every pack installed, by id (what the engine may be asked to apply)."""
        d = self.root / PACKS
        if not d.is_dir():
            return {}
        # Dot-names are copies still being made by an install (renamed into place when complete).
        return {p.name: p for p in sorted(d.iterdir()) if not p.name.startswith(".") and (p / META_FILE).is_file()}

    def install(self, config: PolicyConfig) -> int:
        """Make ``config`` (already validated, pack paths absolute) the version in force; returns its
        number. Raises :class:`PolicyError` naming ``packs.<id>`` for a pack whose id is installed
        with other content; nothing changes then."""
        incoming = {cid: Path(path) for cid, path in config.packs.items()}
        for cid, src in incoming.items():
            have = self.root / PACKS / cid
            if have.is_dir() and not _same_pack(have, src):
                raise PolicyError(
                    f"packs.{cid}: concept '{cid}' is already served with other content; a running server "
                    "keeps an id's pack for the requests that name it, so give the new pack a new id"
                )
        (self.root / PACKS).mkdir(parents=True, exist_ok=True)
        for cid, src in incoming.items():
            have = self.root / PACKS / cid
            if not have.is_dir():
                tmp = Path(tempfile.mkdtemp(prefix=f".{cid}.", dir=self.root / PACKS))
                for name in (META_FILE, TENSORS_FILE):
                    shutil.copy2(src / name, tmp / name)
                os.replace(tmp, have)
        stored = config.model_copy(update={"packs": {cid: f"{PACKS}/{cid}" for cid in incoming}})
        text = yaml.safe_dump(stored.model_dump(mode="json"), sort_keys=False)
        v = self.version() + 1
        while True:  # claim the next free number (another process may be installing too)
            try:
                with (self.root / f"v{v}.yaml").open("x") as f:
                    f.write(text)
                break
            except FileExistsError:
                v += 1
        write_atomic(self.root / CURRENT, f"{v}\n".encode())
        return v


def _same_pack(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in (META_FILE, TENSORS_FILE))
