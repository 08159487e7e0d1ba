"""The ``cellkern`` command line."""
from __future__ import annotations

import subprocess
import sys

import click


@click.group()
@click.version_option(package_name="cellkern")
def main() -> None:
    """cellkern: fused kernels for 3-D cellular neural networks."""


@main.command()
def info() -> None:
    """Print the version, the backends (and why any is missing) and the devices."""
    from .info import describe

    click.echo(describe())


@main.command()
@click.option("--steps", default=200, show_default=True, type=click.IntRange(1), help="propagation steps")
def demo(steps: int) -> None:
    """Run the propagation demo on the embedded glyph."""
    from .demo import main as run

    run(steps=steps)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("suite", default="propagate", type=click.Choice(["propagate", "plasticity", "memory"]))
@click.pass_context
def bench(ctx: click.Context, suite: str) -> None:
    """Run a benchmark suite (extra options go to ``python -m benchmarks.SUITE``)."""
    sys.exit(subprocess.call([sys.executable, "-m", f"benchmarks.{suite}", *ctx.args]))


if __name__ == "__main__":
    main()
