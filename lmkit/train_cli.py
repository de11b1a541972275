"""The train.py command both models share: the process-wide settings, then a Trainer's fit."""
from lmkit import device as dev
from lmkit.config import parse_flags
from lmkit.peers import PeerWatch
from lmkit.process import allow_tf32, keep_freed_memory, protect_console
from lmkit.trainer import Trainer


def main(family, description: str, argv=None) -> int:
    protect_console()  # a closed pipe (| head, a dead tee) must not stop a run; files hold results
    allow_tf32()  # float32 products on NVIDIA GPUs in TF32: several times faster, plenty to train
    flags = parse_flags(family, description, argv)
    trainer = None
    with PeerWatch() as peers:  # under torchrun: a process that fails stops the others, in words
        try:
            trainer = peers.trainer = Trainer(family, flags)
            if trainer.device.type == "cpu":
                keep_freed_memory()  # each step allocates what the last one freed: keep it mapped
            code = trainer.fit()
            trainer.close()  # drops the DDP wrapper before its process group goes
            dev.stop_processes(wait_for_all=True)
            return code
        except BaseException as error:
            explained = peers.explain(error)
            if explained is None:
                raise
            raise explained from None
        finally:
            if trainer is not None:
                trainer.close()
            dev.stop_processes()
