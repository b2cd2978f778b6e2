"""The ``dat`` command. Thin: it parses options and calls the library."""

from __future__ import annotations

import os
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Dialogue Action Tokens: steer a frozen language model toward dialogue goals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

DEMO_DIALOGUES = [
    [{"role": "system", "content": "You are a friendly assistant."},
     {"role": "user", "content": "What should I cook for dinner tonight?"}],
    [{"role": "system", "content": "You are a helpful travel agent."},
     {"role": "user", "content": "I have a free weekend. Any ideas?"}],
    [{"role": "system", "content": "You are a curious person chatting with a stranger."},
     {"role": "user", "content": "Hi! How has your day been?"}],
]


def _run(fn):
    """Turn dat's own errors into a one-line message and exit code 2."""
    from dat.errors import DatError

    try:
        return fn()
    except DatError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def info() -> None:
    """Print versions, the device that 'auto' picks, and the default model's location."""
    import platform

    import torch
    import transformers

    from dat import __version__
    from dat.models import cache_dir, default_gguf_path, resolve_device

    table = Table(show_header=False, box=None)
    table.add_row("dat", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("device (auto)", str(resolve_device("auto")))
    table.add_row("threads", str(torch.get_num_threads()))
    try:
        table.add_row("default model", str(default_gguf_path()))
    except Exception as exc:  # show the install hint instead of failing
        table.add_row("default model", f"[red]{exc}[/]")
    table.add_row("model cache", str(cache_dir()))
    console.print(table)


@app.command()
def generate(
    model: str = typer.Option("default", help="Model: 'default', a hub id, a folder or a .gguf file."),
    position: str = typer.Option("prefix", help="Where action tokens go: prefix | infix | suffix."),
    n_actions: int = typer.Option(2, "--actions", help="Random actions to try per dialogue."),
    action_dim: int = typer.Option(64, help="Action size d' of the PCA up-mapping."),
    n_tokens: int = typer.Option(2, help="Number of action tokens L."),
    act_norm: float = typer.Option(4.0, help="L2 norm of the random actions."),
    max_new_tokens: int = typer.Option(40, help="New tokens per reply."),
    seed: int = typer.Option(0, help="Seed of the random actions."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
) -> None:
    """Show unsteered and steered replies side by side (PCA up-mapping, random actions)."""

    def go():
        import torch

        from dat import SteeredLM, UpMapping
        from dat.planner import normalize_action

        with console.status(f"Loading {model} ..."):
            lm = SteeredLM.from_pretrained(model, device=device)
            up = UpMapping.from_embedding_pca(lm, action_dim, n_tokens, act_norm=1.0).to(lm.device)
        dialogues = DEMO_DIALOGUES
        plain = lm.generate(dialogues, max_new_tokens=max_new_tokens)
        gen = torch.Generator().manual_seed(seed)
        steered = []
        for _ in range(n_actions):
            a = normalize_action(torch.randn(len(dialogues), action_dim, generator=gen), act_norm)
            steered.append(lm.generate(dialogues, actions=up(a.to(lm.device)), position=position,
                                       max_new_tokens=max_new_tokens))
        table = Table(title=f"{lm.name}: unsteered vs steered ({position}, |a| = {act_norm})",
                      show_lines=True)
        table.add_column("user", ratio=1)
        table.add_column("unsteered", ratio=2)
        for k in range(n_actions):
            table.add_column(f"random action {k + 1}", ratio=2)
        for i, d in enumerate(dialogues):
            table.add_row(d[-1]["content"], plain[i], *[s[i] for s in steered])
        console.print(table)

    _run(go)


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

