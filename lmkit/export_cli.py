"""The export.py command both models share: a checkpoint as a Hugging Face GPT-2 folder
(the conversion is lmkit/hf.py)."""
import argparse
from pathlib import Path

from lmkit.checkpoint import find_checkpoint, load_checkpoint_of
from lmkit.device import check_fits, model_shapes
from lmkit.errors import UserError
from lmkit.files import REPO_ROOT, TEMP_NAME_EXTRA, check_path_fits, name_leftovers
from lmkit.hf import export_files, write_folder
from lmkit.process import protect_console


def build_parser(kind: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=kind, help="run whose checkpoints/<run>/best.pt (or last.pt) "
                                               "to export (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint file to export instead")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT,
                   help="folder holding checkpoints/ (default: the repository root)")
    p.add_argument("--out", type=Path, required=True,
                   help="the Hugging Face folder to write (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    return p


def main(family, description: str, argv=None) -> int:
    protect_console()  # a closed pipe must not stop the export; the folder holds the result
    args = build_parser(family.kind, description).parse_args(argv)
    # the folder is first written under a temp name, renamed with ".old" when it replaces one
    check_path_fits(args.out, "choose a shorter --out", extra=TEMP_NAME_EXTRA + len(".old"),
                    room=len("special_tokens_map.json"))  # the longest name written in it
    path = find_checkpoint(args.checkpoint, args.run, args.out_dir, family.kind)
    check_out_spares(args.out, path)
    name_leftovers(args.out)
    state = load_checkpoint_of(family, path, "export")
    _, n_params = model_shapes(family.model_cls, family.config_cls(**state["model_config"]))
    # the model, the float32 tensors GPT-2's layout takes, and their safetensors bytes
    check_fits(12 * n_params, f"exporting the {n_params:,}-parameter model in {path}",
               "export it on a machine with more memory")
    write_folder(args.out, export_files(state, family), args.overwrite,
                 source=f"{path} (step {state['step']})")
    print(f"exported {path} (step {state['step']}) to {args.out}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


def check_out_spares(out: Path, checkpoint: Path) -> None:
    """Writing --out replaces the folder: it must not be, or hold, the checkpoint being read."""
    out, checkpoint = out.resolve(), checkpoint.resolve()
    if out == checkpoint or out in checkpoint.parents:
        raise UserError(f"--out {out} holds the checkpoint being exported ({checkpoint}); "
                        "choose a folder outside its run, such as hf/<run>")
