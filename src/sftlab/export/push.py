"""`sftlab push EXPORT --repo ID`: an export folder to the Hugging Face Hub with huggingface_hub's upload_folder.

--dry-run lists what would be sent (name and size) and sends nothing. A missing token, a refused repository or a
network failure is one line that says what to do, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SftlabError

REQUIRED = ("README.md", "sftlab_export.json")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_folder(export: str | Path) -> Path:
    folder = Path(export)
    if not folder.is_dir():
        raise SftlabError(f"{folder}: no such folder; give a folder that `sftlab export` wrote")
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    if missing:
        raise SftlabError(f"{folder}: not an sftlab export (no {', '.join(missing)}); write one with "
                          "sftlab export RUN -o FOLDER")
    return folder


def check_repo(repo: str) -> str:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo):
        raise SftlabError(f"--repo {repo!r}: give a Hub repository id, OWNER/NAME (e.g. you/my-model)")
    return repo


def plan(folder: Path, repo: str, private: bool) -> str:
    files = _files(folder)
    total = sum(p.stat().st_size for p in files)
    lines = [f"would upload {len(files)} files ({_size(total)}) to https://huggingface.co/{repo} "
             f"({'private' if private else 'public'} model repository):"]
    lines += [f"  {p.relative_to(folder)}  {_size(p.stat().st_size)}" for p in files]
    return "\n".join(lines)


def push(export: str | Path, repo: str, private: bool = False, dry_run: bool = False) -> str:
    """Upload (or, dry run, list) the export folder; returns what to print."""
    folder = check_folder(export)
    check_repo(repo)
    if dry_run:
        return plan(folder, repo, private) + "\n(dry run: nothing was sent)"
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import get_token
    except ImportError:
        raise SftlabError("sftlab push needs huggingface_hub: pip install huggingface_hub") from None
    if not get_token():
        raise SftlabError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN), then push again; "
                          "--dry-run lists the files without one")
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message=f"sftlab export of {folder.name}")
    except Exception as e:  # HTTP, connection, auth: one line, what happened and what to try
        raise SftlabError(f"push to {repo} failed ({_reason(e)}); check the token's write access and the network, "
                          "then push again (--dry-run lists what would be sent)") from None
    return f"sftlab: pushed {folder} to {getattr(info, 'commit_url', None) or f'https://huggingface.co/{repo}'}"


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
