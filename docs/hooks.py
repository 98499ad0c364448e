"""mkdocs hooks (mkdocs.yml `hooks:`): the pages that are generated when the site is built, so none can drift.

- `index.md` is README.md, its links to `docs/X.md` made site links and its links to other repository files
  (which the site does not hold) written as their paths;
- `cli.md`'s placeholder becomes the reference of the typer app `sdsurgeon.cli:app`, rendered by typer's own
  docs renderer (what `typer sdsurgeon.cli utils docs` writes) from the commands and options themselves;
- `python-api.md`'s placeholder becomes one mkdocstrings entry per public name (`sdsurgeon._PUBLIC`);
- `layout.md`'s placeholder becomes the table of floors: tests/test_layout.py's `FLOORS` (what the test enforces)
  and each module's own first docstring line (what the layout test requires every module to open with).

A placeholder that is missing is an error, so a page cannot silently lose its generated part.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
CLI_PLACEHOLDER = re.compile(r"<!-- cli-reference:[^>]*-->")
API_PLACEHOLDER = re.compile(r"<!-- api-reference:[^>]*-->")
LAYOUT_PLACEHOLDER = re.compile(r"<!-- layout-table:[^>]*-->")
LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def _site_link(match: re.Match) -> str:
    text, target = match.groups()
    if re.match(r"[a-z]+:|#", target):
        return match.group(0)
    if target.startswith("docs/") and target != "docs/":
        return f"[{text}]({target[len('docs/'):]})"
    if text.strip("`/") == target.strip("/"):
        return f"`{target}`"
    return f"{text} (`{target}`)"


def readme_as_index() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out, fenced = [], False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(_site_link, line))
    return "".join(out)


def cli_reference() -> str:
    import typer.main
    from typer.cli import get_docs_for_click

    from sdsurgeon.cli import app

    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="sdsurgeon")
    return get_docs_for_click(obj=command, ctx=ctx, name="sdsurgeon", indent=1).rstrip() + "\n"


def api_reference() -> str:
    import sdsurgeon

    return "\n".join(f"::: sdsurgeon.{name}\n" for name in sorted(sdsurgeon._PUBLIC, key=str.lower))


def _first_line(path: Path) -> str:
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def layout_table() -> str:
    """One row per module or package of sdsurgeon/, by floor: the floors test_layout.py enforces, the lines the
    modules open with."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sdsurgeon_layout", ROOT / "tests" / "test_layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    package = ROOT / "sdsurgeon"
    rows = ["| floor | module | what it owns |", "|---|---|---|"]
    for name, floor in sorted(layout.FLOORS.items(), key=lambda item: (item[1], item[0] != "__init__", item[0])):
        if "." in name:  # one module placed apart from its package
            rows.append(f"| {floor} | `{name.replace('.', '/')}.py` | {_first_line(package / (name.replace('.', '/') + '.py'))} |")
        elif (package / name).is_dir():
            subs = sorted(p.stem for p in (package / name).glob("*.py")
                          if p.stem != "__init__" and f"{name}.{p.stem}" not in layout.FLOORS)
            what = _first_line(package / name / "__init__.py") + (f" ({', '.join(f'`{s}`' for s in subs)})" if subs else "")
            rows.append(f"| {floor} | `{name}/` | {what} |")
        elif (package / f"{name}.py").exists():
            rows.append(f"| {floor} | `{name}.py` | {_first_line(package / f'{name}.py')} |")
        else:
            raise PluginError(f"tests/test_layout.py gives {name!r} a floor, but sdsurgeon/ has no such module")
    return "\n".join(rows) + "\n"


def on_files(files, config):
    if files.get_file_from_path("index.md") is not None:
        raise PluginError("docs/index.md exists, but the home page is generated from README.md: remove it")
    files.append(File.generated(config, "index.md", content=readme_as_index()))
    return files


def _fill(markdown: str, placeholder: re.Pattern, content, page) -> str:
    if not placeholder.search(markdown):
        raise PluginError(f"{page.file.src_uri}: the placeholder {placeholder.pattern!r} is missing")
    return placeholder.sub(lambda _: content(), markdown, count=1)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "cli.md":
        return _fill(markdown, CLI_PLACEHOLDER, cli_reference, page)
    if page.file.src_uri == "python-api.md":
        return _fill(markdown, API_PLACEHOLDER, api_reference, page)
    if page.file.src_uri == "layout.md":
        return _fill(markdown, LAYOUT_PLACEHOLDER, layout_table, page)
    return markdown
