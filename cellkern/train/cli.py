"""The ``cellkern`` command line."""
from __future__ import annotations

import math
import os
import sys

import click


@click.group()
@click.version_option(package_name="cellkern")
def main() -> None:
    """cellkern: fused kernels for 3-D cellular neural networks."""


@main.command()
def info() -> None:
    """Print the version, the backends (and why any is missing) and the devices."""
    from ..info import describe

    click.echo(describe())


def _config(path):
    from .config import default_config, load_config

    return load_config(path) if path else default_config()


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="schedule file (.toml/.yaml); default: the built-in run (train.config.default_config: the mixing model on digits)")
@click.option("--out", type=click.Path(file_okay=False), default="runs/latest", show_default=True,
              help="folder for the config copy, checkpoints, report.json and plots")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="continue the run in this folder from its last checkpoint")
@click.option("--progress/--no-progress", default=True, help="progress bar per stage")
@click.option("--parallel", type=click.Choice(["data", "domain"]), default=None,
              help="under torchrun: split the batch (data) or the lattice along z (domain) over the processes")
@click.option("--device", default=None, metavar="cpu|cuda|cuda:N|auto",
              help="where the run's tensors live (overrides the config's device; with --resume, "
                   "the run continues there); default: the config's (cpu)")
def run(config_path, out, resume, progress, parallel, device) -> None:
    """Run the staged schedule (the main job) and write its report.

    On several processes: torchrun --nproc-per-node 2 -m cellkern.train.cli run --parallel data
    (or domain); the result equals the one-process run, rank 0 writes the files."""
    from .layouts import init_from_env, shutdown
    from .report import summary_table
    from .checkpoint import RunLockedError
    from .trainer import RunInterrupted, Trainer

    world = init_from_env()
    if world > 1 and parallel is None:
        raise click.UsageError(f"started on {world} processes: choose --parallel data or --parallel domain")
    if parallel is not None and world == 1 and "WORLD_SIZE" not in os.environ:
        raise click.UsageError(f"--parallel {parallel} runs under torchrun, e.g. "
                               f"`torchrun --nproc-per-node 2 -m cellkern.train.cli run --parallel {parallel}`")
    try:
        if resume:
            if config_path:
                raise click.UsageError("--resume continues with the run's own config; drop --config")
            trainer = Trainer.resume(resume, device=device, progress=progress, parallel=parallel)
        else:
            cfg = _config(config_path)
            if device is not None:
                cfg.device = device
            trainer = Trainer(cfg, out, progress=progress, parallel=parallel)
        report = trainer.run()
    except RunInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_status)
    except (ValueError, TypeError, FileNotFoundError, RunLockedError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        shutdown()
    if parallel is None or trainer.par.is_writer:
        click.echo("")
        click.echo(summary_table(report))


@main.command()
@click.option("--budget", default="24GB", show_default=True, help="memory budget, e.g. 24GB, 16GiB, 512MB")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="schedule file; default: the built-in schedule")
def plan(budget, config_path) -> None:
    """Per stage: dims, cells, synapses and estimated memory under a budget,
    and the largest preset that fits."""
    import torch

    from ..memory import fit_dims, parse_bytes
    from ..sparse import keep_count
    from .planning import fit_stage, stage_estimate, stage_memory_config
    from ..stencil import stencil as make_stencil

    try:
        cfg = _config(config_path)
        budget_bytes = parse_bytes(budget)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    K = make_stencil(cfg.stencil).K
    click.echo(f"budget {budget} = {budget_bytes / 2**30:.2f} GiB; B = {cfg.batch}, C = {cfg.channels}, "
               f"{cfg.stencil} (K = {K})")
    click.echo(f"{'stage':<20} {'dims':>12} {'cells':>12} {'synapses':>14} {'est. memory':>13}  fits")
    for st in cfg.stages:
        need = stage_estimate(cfg, st, st.dims)
        cells = math.prod(st.dims)
        try:
            runs = fit_stage(cfg, st, budget_bytes)
            fits = "yes" if runs == tuple(st.dims) else f"no -> runs at {'x'.join(map(str, runs))}"
        except ValueError:
            fits = "no (nothing fits)"
        click.echo(f"{st.name:<20} {'x'.join(map(str, st.dims)):>12} {cells:>12,} "
                   f"{int(keep_count(torch.tensor(K), st.sparse_keep)) * cells:>14,} {need / 2**20:>10.1f} MiB  {fits}")
    try:
        best = fit_dims(budget_bytes, stage_memory_config(cfg, cfg.stages[-1]))
        click.echo(f"largest preset that fits (last stage's settings): {'x'.join(map(str, best))} "
                   f"({math.prod(best):,} cells)")
    except ValueError as exc:
        click.echo(f"no preset fits: {exc}")


if __name__ == "__main__":
    main()
