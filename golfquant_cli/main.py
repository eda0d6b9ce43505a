"""Entry point: one click group; every user-caused error becomes one line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys

import click

from golfquant.errors import GolfquantError, OptionError

TORCHRUN_COMMANDS = ("quantize", "roundtrip-eval", "sweep", "train")


class GolfquantGroup(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except GolfquantError as e:
            if getattr(e, "raised_on_every_rank", False) and _rank() != 0:
                sys.exit(0)  # rank 0 has the same error and reports it; exiting 0 lets torchrun wait for it
            _fail(str(e) if _rank() == 0 else f"rank {_rank()}: {e}")
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            _fail("aborted")
        except click.ClickException as e:
            _fail(e.format_message())

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and command.name not in TORCHRUN_COMMANDS and os.environ.get("WORLD_SIZE", "1") != "1":
            error = OptionError(f"{command.name} runs in one process; run it without torchrun (these run under "
                                f"it: {', '.join(sorted(TORCHRUN_COMMANDS))})")
            error.raised_on_every_rank = True
            raise error
        return name, command, rest

    def invoke(self, ctx):
        _limit_threads()
        return super().invoke(ctx)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _fail(message: str) -> None:
    one_line = " ".join(message.split())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(2)


def _limit_threads() -> None:
    """One thread unless asked: torch's threads on a busy core run ~10x slower than one thread."""
    import torch

    torch.set_num_threads(int(os.environ.get("GOLFQUANT_THREADS", "1")))


@click.group(cls=GolfquantGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="golfquant")
def cli() -> None:
    """Quantize, pack, compress and evaluate Parameter Golf checkpoints."""


def _register() -> None:
    from golfquant_cli.data_cmd import data
    from golfquant_cli.demo_cmd import demo
    from golfquant_cli.export_loader_cmd import export_loader
    from golfquant_cli.pack_code_cmd import pack_code
    from golfquant_cli.quantize_cmd import quantize
    from golfquant_cli.roundtrip_cmd import roundtrip_eval_cmd
    from golfquant_cli.size_report_cmd import size_report
    from golfquant_cli.sweep_cmd import sweep
    from golfquant_cli.train_cmd import train

    for command in (quantize, size_report, roundtrip_eval_cmd, sweep, train, data, pack_code, export_loader, demo):
        cli.add_command(command)


_register()

if __name__ == "__main__":
    cli()
