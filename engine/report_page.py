"""index.html of a results folder: test.py's (beside metrics.csv) and predict.py's (beside volumes.csv).

One self-contained page per folder, to be opened from disk: no script, no network, every link a relative path to a
file of the folder that exists (overlays, NIfTI predictions), so the folder can be copied or archived whole. Every
string from the run (case names, paths, reasons) is escaped.
"""
import html
import math
from pathlib import Path
from urllib.parse import quote

from engine.test_results import TABLE_NAMES
from utils import PATHOLOGY, atomic_path

STRUCTURE_NAMES = {**TABLE_NAMES, "myocardium": "Normal myocardium"}

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img.overlay { width: 420px; }
p.note { color: #555; max-width: 60em; }
"""


class Markup(str):
    """Text that is already HTML (built here from escaped parts): not escaped again."""


def escaped(value):
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


def link(name):
    """A link to ``name``, a file of the page's folder."""
    return Markup(f'<a href="{html.escape(quote(name))}">{escaped(name)}</a>')


def table(header, rows, numbers=(), groups=None):
    """A table; ``numbers``: the columns aligned right; ``groups``: a header row above ``header`` of
    (label, columns spanned)."""
    head = "".join(f"<th>{escaped(cell)}</th>" for cell in header)
    if groups:
        head = ("".join(f'<th colspan="{span}">{escaped(label)}</th>' for label, span in groups)
                + "</tr>\n<tr>" + head)
    aligned = ['<td class="number">' if index in numbers else "<td>" for index in range(len(header))]
    body = "".join("<tr>" + "".join(f"{aligned[index]}{escaped(cell)}</td>" for index, cell in enumerate(row))
                   + "</tr>\n" for row in rows)
    return Markup(f"<table>\n<tr>{head}</tr>\n{body}</table>\n")


def note(text):
    return Markup(f'<p class="note">{escaped(text)}</p>\n')


def heading(text):
    return Markup(f"<h2>{escaped(text)}</h2>\n")


def write_page(path, title, parts):
    """The page of ``parts`` (Markup) under ``title``, written atomically."""
    document = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escaped(title)}</title>\n'
                f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escaped(title)}</h1>\n" + "".join(parts)
                + "</body>\n</html>\n")
    with atomic_path(path) as temporary:
        temporary.write_text(document, encoding="utf-8")


def is_defined(value):
    return value is not None and math.isfinite(value)


def number(value, scale=1.0, digits=2):
    return f"{value * scale:.{digits}f}" if is_defined(value) else "n/a"


def overlay_and_files(folder, case, files):
    """(overlay cell, files cell) of a case: the thumbnail linked to its PNG, and links to those of ``files`` that
    exist in ``folder``."""
    overlay = f"{case}.png"
    address = html.escape(quote(overlay))
    thumbnail = (Markup(f'<a href="{address}"><img class="overlay" src="{address}" '
                        f'alt="{html.escape(f"overlay of {case}")}"></a>')
                 if (folder / overlay).is_file() else "no overlay (--save_png)")
    existing = [link(name) for name in files if (folder / name).is_file()]
    return thumbnail, Markup("<br>".join(existing)) if existing else "none"


def left_out_section(title, reasons, explanation):
    if not reasons:
        return Markup("")
    return Markup(heading(title) + note(explanation)
                  + table(["case", "reason"], sorted(reasons.items())))


# test.py --------------------------------------------------------------------------------------------------------

def pathology_dice(metrics):
    """Mean of the scar and edema Dice that are defined (NaN: absent from reference and prediction), or None when
    neither is."""
    defined = [metrics[name][0] for name in PATHOLOGY if is_defined(metrics[name][0])]
    return sum(defined) / len(defined) if defined else None


def worst_first(per_case):
    """Case names by pathology Dice, lowest first; cases whose pathology Dice is undefined (no scar or edema in
    reference nor prediction: nothing to miss) last, by name."""
    return sorted(per_case, key=lambda case: (pathology_dice(per_case[case]) is None,
                                              pathology_dice(per_case[case]) or 0.0, case))


def metrics_by_case(rows):
    """{case: {structure: (dice, hd95)}} from metrics.csv's rows."""
    per_case = {}
    for row in rows:
        per_case.setdefault(row["case"], {})[row["structure"]] = (float(row["dice"]), float(row["hd95"]))
    return per_case


def test_setting(info, summary, cases_scored):
    entry = summary["scar"]
    subset = list(info.get("sequences") or [])
    rows = [("checkpoint", f"{info['checkpoint']} (epoch {info['epoch']})"),
            ("ensemble", "; ".join(info["ensemble"]) if len(info.get("ensemble", [])) > 1 else "no"),
            ("split", f"{info['split']} of {info['root_path']}"),
            ("protocol", info["protocol"]), ("TTA (four flips)", "yes" if info["tta"] else "no"),
            ("postprocess (largest myocardium)", "yes" if info["postprocess"] else "no"),
            ("heads", ", ".join(info["heads"])),
            ("sequences", ", ".join(subset) + (f" (the others: {info['missing']})" if len(subset) < 3 else "")),
            ("scored in", f"the {entry['space']} space, HD95 in {entry['hd95_unit']}"),
            ("cases", f"{cases_scored} scored, {len(info.get('left_out') or {})} left out"
                      + (f"; stopped by a signal after {info['stopped_after']}" if info.get("stopped_after") else "")),
            ("seconds", info.get("seconds"))]
    return table(["setting", "value"], rows)


def summary_table(summary):
    unit = summary["scar"]["hd95_unit"]

    def mean_std(entry, key, scale):
        return "n/a" if entry[key] is None else f"{entry[key] * scale:.2f} ± {entry[f'{key}_std'] * scale:.2f}"

    rows = [(STRUCTURE_NAMES[name], mean_std(entry, "dice", 100), mean_std(entry, "hd95", 1), entry["n"],
             entry["n_undefined_dice"], entry["n_undefined_hd95"]) for name, entry in summary.items()]
    pathology = [summary[name] for name in PATHOLOGY]
    if all(entry["dice"] is not None for entry in pathology):
        hd95 = [entry["hd95"] for entry in pathology]
        rows.append(("Mean pathology", f"{sum(entry['dice'] for entry in pathology) / len(pathology) * 100:.2f}",
                     f"{sum(hd95) / len(hd95):.2f}" if None not in hd95 else "n/a", "", "", ""))
    return table(["structure", "Dice (%)", f"HD95 ({unit})", "n", "undefined Dice", "undefined HD95"], rows,
                 numbers=(1, 2, 3, 4, 5))


def write_test_page(out_dir, info, summary, metric_rows):
    """test.py's index.html in ``out_dir``: the setting (test_info.json's ``info``), the summary, and one row per
    case, worst pathology Dice first, from metrics.csv's rows; cases left out with their reason."""
    out_dir = Path(out_dir)
    per_case = metrics_by_case(metric_rows)
    structures = list(summary)
    unit = summary["scar"]["hd95_unit"]
    groups = [("", 3), *((STRUCTURE_NAMES[name], 2) for name in structures), ("", 2)]
    header = ["#", "case", "pathology Dice (%)", *(["Dice (%)", f"HD95 ({unit})"] * len(structures)), "overlay",
              "files"]
    rows = []
    for rank, case in enumerate(worst_first(per_case), 1):
        metrics = per_case[case]
        rows.append([rank, case, number(pathology_dice(metrics), 100, 1),
                     *(value for name in structures
                       for value in (number(metrics[name][0], 100, 1), number(metrics[name][1]))),
                     *overlay_and_files(out_dir, case, [f"{case}_pred.nii.gz", f"{case}.png"])])
    parts = [heading("Setting"), test_setting(info, summary, len(per_case)), heading("Summary"),
             summary_table(summary), heading("Cases, worst first"),
             note("Sorted by pathology Dice, the mean of the scar and edema Dice that are defined, lowest first. A "
                  "Dice or HD95 is undefined (n/a) when the structure is absent from reference and prediction "
                  "(HD95 also when absent from one of them); cases with neither scar nor edema in reference and "
                  "prediction have no pathology Dice and come last. Scores are computed in each case's space "
                  "(see the setting); the overlays are drawn in the processed grid."),
             table(header, rows, numbers=(0, *range(2, 3 + 2 * len(structures))), groups=groups),
             left_out_section("Cases left out", info.get("left_out") or {},
                              "These cases could not be scored and are not in the summary (n_left_out).")]
    write_page(out_dir / "index.html", f"test.py results: {out_dir.name}", parts)


# predict.py -----------------------------------------------------------------------------------------------------

VOLUME_HEADERS = {"normal_myocardium_ml": "normal myocardium (mL)", "scar_ml": "scar (mL)", "edema_ml": "edema (mL)",
                  "whole_myocardium_ml": "whole myocardium (mL)", "scar_percent": "scar (% of whole)",
                  "edema_percent": "edema (% of whole)"}


def write_prediction_page(out_dir, setting, rows):
    """predict.py's index.html in ``out_dir``: ``setting`` [(name, value)], and volumes.csv's ``rows`` (one per
    case in the order predicted; a failed case's with its "error") as a table of volumes and a table of errors."""
    out_dir = Path(out_dir)
    predicted = [row for row in rows if not row.get("error")]
    failed = {row["case"]: row["error"] for row in rows if row.get("error")}
    header = ["case", "sequences used", *VOLUME_HEADERS.values(), "overlay", "files"]
    table_rows = [[row["case"], row["sequences"].replace(";", ", "),
                   *(number(row[column]) for column in VOLUME_HEADERS),
                   *overlay_and_files(out_dir, row["case"], [f"{row['case']}.nii.gz", f"{row['case']}.png"])]
                  for row in predicted]
    parts = [heading("Setting"), table(["setting", "value"],
                                       [*setting, ("cases", f"{len(predicted)} predicted, {len(failed)} failed")]),
             heading("Cases"),
             note("Volumes of the predicted labels in each patient's own grid (volumes.csv); percentages of the "
                  "whole myocardium (n/a without myocardium). The overlays are drawn in the processed grid."),
             table(header, table_rows, numbers=tuple(range(2, 2 + len(VOLUME_HEADERS)))),
             left_out_section("Cases that failed", failed, "These cases have no prediction; the reason for each.")]
    write_page(out_dir / "index.html", f"predict.py results: {out_dir.name}", parts)
