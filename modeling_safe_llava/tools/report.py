"""Human-readable reports of safety verdicts: a printed table, an HTML page and a PNG grid of images."""

import base64
import html
import io
from pathlib import Path

from PIL import Image

COLUMNS = ("id", "true", "category", "level", "risk", "action", "answer")
# A spreadsheet reads a cell that starts with one of these as a formula (CSV injection).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """`value` for a CSV cell: a string that a spreadsheet would run as a formula gets a leading `'`; numbers and
    other strings are returned unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


def verdict_rows(records: list[dict], assessments: list[dict], answers: list[str]) -> list[dict]:
    """One row per judged image: the label, the verdict and the answer."""
    rows = []
    for record, verdict, answer in zip(records, assessments, answers):
        rows.append(
            {
                "id": record["id"],
                "true": f"{record['type_name']} / L{record['safe_level']}",
                "category": verdict["category_name"],
                "level": verdict["level"],
                "risk": round(verdict["risk"], 3),
                "action": verdict["action"],
                "answer": " ".join(answer.split()),
            }
        )
    return rows


def format_table(rows: list[dict], max_answer: int = 60) -> str:
    """A fixed-width text table of `verdict_rows`."""
    cells = [[str(row[c]) if c != "answer" else _shorten(row[c], max_answer) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells)
    return "\n".join(lines)


def write_html_report(rows: list[dict], images: list[Image.Image], path: Path, title: str, notes: str = "") -> Path:
    """An HTML page with every image (embedded) and its verdict."""
    body = []
    for row, image in zip(rows, images):
        colour = {"allow": "#2e7d32", "hint": "#ef6c00", "refuse": "#c62828"}[row["action"]]
        body.append(
            f'<div class="card"><img src="data:image/png;base64,{_png_base64(image)}" alt="{html.escape(row["id"])}">'
            f'<p><b style="color:{colour}">{row["action"].upper()}</b> {html.escape(row["category"])} '
            f"(level {row['level']}, risk {row['risk']})</p><p>label: {html.escape(row['true'])}</p>"
            f"<p class=answer>{html.escape(row['answer'])}</p></div>"
        )
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}.card{display:inline-block;width:220px;vertical-align:top;margin:8px;"
        "padding:8px;border:1px solid #ccc;border-radius:6px}.card img{width:200px;image-rendering:pixelated}"
        ".answer{font-size:12px;color:#444}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>{''.join(body)}</body></html>"
    )
    path.write_text(page)
    return path


def write_png_report(rows: list[dict], images: list[Image.Image], path: Path, columns: int = 4) -> Path:
    """A grid of the images, each titled with its verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(rows)
    grid_rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 3.4 * grid_rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row, image in zip(axes.flat, rows, images):
        axis.imshow(image)
        colour = {"allow": "green", "hint": "darkorange", "refuse": "red"}[row["action"]]
        axis.set_title(f"{row['action'].upper()}: {row['category']}\nrisk {row['risk']}  (label {row['true']})", fontsize=8, color=colour)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
