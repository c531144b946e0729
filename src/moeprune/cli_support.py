"""CLI support: up-front checks (writable outputs, model flags), hub snapshots, and messages in CLI spelling."""
from __future__ import annotations

import logging
import os


def writable_file(path: str | None, what: str) -> None:
    """Fail before any computation when ``path`` cannot be written (results would be lost at the end)."""
    if path:
        writable_dir(os.path.dirname(os.path.abspath(path)), what)


def writable_dir(folder: str, what: str) -> None:
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".moeprune-write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"{what} folder {folder} is not writable ({e.strerror or e}); choose another --out "
                              "before computing anything") from None


def check_model_args(a) -> None:
    """Validate --dtype/--device/--experts-implementation before loading anything."""
    from moeprune.models import check_device, check_experts_implementation, parse_dtype

    parse_dtype(a.dtype)
    if getattr(a, "device", None):
        check_device(a.device)
    check_experts_implementation(getattr(a, "experts_implementation", None))


def hub_snapshot(repo: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py",
                                                       "*.jinja"])
    except Exception as e:  # noqa: BLE001 (offline, no such repo, no connection: huggingface_hub raises many types)
        raise FileNotFoundError(f"--model {repo!r} is neither a local folder (current folder {os.getcwd()}) nor a "
                                f"hub model available here ({type(e).__name__}); offline, only cached models load"
                                ) from None


def warn_uncovered(model, plan) -> None:
    """A plan without an entry for some MoE layer leaves it unpruned: say so (an explicit, logged choice)."""
    from moeprune.apply.experts import moe_blocks

    missing = plan.uncovered_layers(moe_blocks(model))
    if missing:
        logging.getLogger("moeprune").warning("the plan has no entry for MoE layers %s: they stay unpruned", missing)


class StageFailed(RuntimeError):
    """A late stage failed after earlier results were saved."""


# API spellings in messages -> what a CLI user types
CLI_SPELLING = (
    ("pass overwrite=True", "pass --overwrite"),
    ("use an empty checkpoint_dir or resume=False", "delete that folder or observe into a new --out folder"),
    ("pass tokenizer=... (the model folder has none)", "add a tokenizer to the model folder"),
)
# recipe keys -> the flag of the stage commands that set them (run / validate keep the recipe spelling)
FLAG_SPELLING = {
    "eval": (("eval.perplexity=", "--text "), ("set perplexity: null to skip perplexity", "pass --text none"),
             ("eval.lm_eval_include_path=", "--include-path ")),
    "observe": (("calibration.dataset=", "--data "),),
}


def cli_message(e: BaseException, cmd: str | None = None) -> str:
    """One readable line (or a few for several recipe errors), in the spelling of the CLI command ``cmd``."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc and f"{loc.split('.')[-1]}=" not in msg else msg)
        msg = "; ".join(lines)
    else:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    for api, cli in CLI_SPELLING + FLAG_SPELLING.get(cmd or "", ()):
        msg = msg.replace(api, cli)
    return msg


def quiet_libraries() -> None:
    """--quiet: no transformers / hub progress bars or loading chatter, no accelerate meta-device warning."""
    import warnings

    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    for name in ("accelerate", "accelerate.utils.modeling", "accelerate.big_modeling"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="accelerate")
    warnings.filterwarnings("ignore", module="transformers")
