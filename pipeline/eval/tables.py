"""Result tables in Markdown. P1 and P3 never share a table."""

from __future__ import annotations


def metric_columns(ks) -> list[str]:
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


def markdown_table(rows: list[dict], columns: list[str], labels: list[str]) -> str:
    """rows: dicts with the label keys and metric fractions; metrics printed in % (2 decimals)."""
    header = "| " + " | ".join(labels + [c.upper() for c in columns]) + " |"
    rule = "|" + "---|" * (len(labels) + len(columns))
    lines = [header, rule]
    for row in rows:
        cells = [str(row[label]) for label in labels]
        cells += [f"{100 * row[c]:.2f}" if c in row else "–" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
