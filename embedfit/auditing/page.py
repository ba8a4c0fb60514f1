"""The page of an audit folder (`embedfit report AUDIT_DIR`): each finding with its thumbnails side by side, and a
list of fixes to take out.

The page is one self-contained HTML file (thumbnails inlined as JPEG data URLs). Each finding has an action
(keep, exclude, or relabel to a class); "Download fixes.csv" writes the chosen actions as `path,action` rows, which
`embedfit fit --exclude` accepts (and a relabel step can read). The same CSV, with the default actions, is written
beside the audit as fixes.csv, for those who edit it by hand.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from embedfit.auditing.core import KINDS, AuditResult, read_audit
from embedfit.errors import OutputError, check_output_file
from embedfit.runs import FORMULA_START, write_csv

MAX_PER_KIND = 200  # findings shown per kind (all of them are in audit.csv and fixes.csv)
THUMB = 160
# What a finding's image most likely needs; the user changes it on the page or in fixes.csv.
DEFAULT_ACTION = {"exact_duplicate": "exclude", "train_test_leak": "exclude"}


def default_fixes(result: AuditResult) -> list[dict[str, str]]:
    """One `path,action` row per image named by a finding (its first finding decides the default action).

    A leak's `path` is the test store's image; the training copy (`other`) is the one `fit --exclude` can leave out.
    """
    fixes: dict[str, str] = {}
    for f in result.findings:
        path = f["other"] if f["kind"] == "train_test_leak" else f["path"]
        fixes.setdefault(path, DEFAULT_ACTION.get(f["kind"], "keep"))
    return [{"path": p, "action": a} for p, a in fixes.items()]


def _thumbnail(path: Path) -> str:
    from embedfit.images import decode_image

    try:
        image = decode_image(path)
    except Exception:  # moved, deleted or unreadable since the audit: the finding is still shown
        return '<div class="missing">image not found</div>'
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(path.name)}">'


def _figure(root: str, key: str, caption: str) -> str:
    path = Path(key) if Path(key).is_absolute() else Path(root) / key
    return (f"<figure>{_thumbnail(path)}<figcaption>{html.escape(caption)}<br><code>{html.escape(key)}</code>"
            "</figcaption></figure>")


def _card(f: dict[str, Any], settings: dict[str, Any], classes: list[str], n: int) -> str:
    train_root, test_root = settings.get("root", "."), settings.get("test_root") or "."
    leak = f["kind"] == "train_test_leak"
    figures = [_figure(test_root if leak else train_root, f["path"], f"given: {f['given'] or '-'}")]
    if f["other"]:
        caption = f"training image, {f['suggested']}" if leak else "its pair"
        figures.append(_figure(train_root, f["other"], caption))
    target = f["other"] if leak else f["path"]
    default = DEFAULT_ACTION.get(f["kind"], "keep")
    options = ["keep", "exclude"] + [f"relabel:{c}" for c in classes if c != f["given"]]
    if f["kind"] == "label_issue" and f["suggested"]:
        options.remove(f"relabel:{f['suggested']}")
        options.insert(1, f"relabel:{f['suggested']}")
    select = "".join(f'<option{" selected" if o == default else ""}>{html.escape(o)}</option>' for o in options)
    suggested = f" &middot; suggested: <b>{html.escape(f['suggested'])}</b>" if f["suggested"] and not leak else ""
    return (f'<div class="card"><div class="pair">{"".join(figures)}</div><div class="meta">'
            f"score {float(f['score']):.3f}{suggested}<br>action for <code>{html.escape(target)}</code>: "
            f'<select data-path="{html.escape(target)}" id="a{n}">{select}</select></div></div>')


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}h2{margin-top:1.6em}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:360px}
.pair{display:flex;gap:8px}figure{margin:0;width:170px;font-size:12px}figure img{max-width:160px;max-height:160px}
.missing{width:160px;height:100px;background:#eee;display:flex;align-items:center;justify-content:center}
.meta{font-size:13px;margin-top:6px}code{word-break:break-all}table{border-collapse:collapse}
td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}button{font-size:15px;padding:6px 14px}
"""

# Cells escaped as `embedfit.runs.csv_cell` escapes them (a leading "'" before a formula character or a "'"), so
# that a spreadsheet shows a path such as "=HYPERLINK(...).jpg" as text and `read_exclusions` reads it back.
_FORMULA = "".join({"\t": "\\t", "\r": "\\r", "-": "\\-"}.get(c, c) for c in (*FORMULA_START, "'"))
_SCRIPT = """
function csvCell(v){
  v=String(v); if(/^[FORMULA]/.test(v)) v="'"+v;
  return '"'+v.replace(/"/g,'""')+'"';
}
function fixesCsv(){
  const rows=[["path","action"]], seen=new Set();
  document.querySelectorAll("select[data-path]").forEach(s=>{
    const p=s.dataset.path; if(seen.has(p)) return; seen.add(p); rows.push([p,s.value]);});
  return rows.map(r=>r.map(csvCell).join(",")).join("\\n")+"\\n";
}
function fixes(){
  const a=document.createElement("a");
  a.href=URL.createObjectURL(new Blob([fixesCsv()],{type:"text/csv"})); a.download="fixes.csv"; a.click();
}
""".replace("FORMULA", _FORMULA)


def build_audit_report(folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the HTML page of an audit folder, and fixes.csv (default actions) into the folder.

    Args:
        folder: An audit folder written by `embedfit.audit`.
        output: The HTML file to write.

    Returns:
        The page's path.

    Raises:
        InputError: `folder` holds no audit.
        OutputError: The page or fixes.csv cannot be written.
    """
    output = check_output_file(output)
    result = read_audit(folder)
    settings = result.settings
    classes = sorted({f["given"] for f in result.findings if f["given"]} |
                     {f["suggested"] for f in result.findings if f["suggested"]})
    parts = [f"<h1>Audit of {html.escape(Path(str(settings.get('store', ''))).name)}</h1>",
             f"<p>{settings.get('images')} images, backbone {html.escape(str(settings.get('backbone')))}, "
             f"near-duplicate threshold {settings.get('threshold')}, exact copies by "
             f"{html.escape(str(settings.get('exact_by')))}.</p>"]
    parts += [f"<p><i>note: {html.escape(n)}</i></p>" for n in result.notes]
    parts.append("<table><tr><th>finding</th><th>count</th></tr>" + "".join(
        f"<tr><td><a href='#{k}'>{k}</a></td><td>{result.counts.get(k, 0)}</td></tr>" for k in KINDS) + "</table>")
    parts.append('<p><button onclick="fixes()">Download fixes.csv</button> the actions chosen below, as '
                 "<code>path,action</code>: hand it to <code>embedfit fit --exclude</code>.</p>")
    n = 0
    for kind in KINDS:
        found = [f for f in result.findings if f["kind"] == kind]
        if not found:
            continue
        more = f" (the first {MAX_PER_KIND} of {len(found)}; all are in audit.csv)" if len(found) > MAX_PER_KIND else ""
        parts.append(f'<h2 id="{kind}">{kind} ({len(found)}){more}</h2><div class="cards">')
        for f in found[:MAX_PER_KIND]:
            parts.append(_card(f, settings, classes, n))
            n += 1
        parts.append("</div>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>embedfit audit</title><style>{_STYLE}</style>"
            f"<script>{_SCRIPT}</script></head><body>{''.join(parts)}</body></html>")
    fixes = Path(folder) / "fixes.csv"
    try:
        output.write_text(page, encoding="utf-8")
        write_csv(fixes, ["path", "action"], ([row["path"], row["action"]] for row in default_fixes(result)))
    except OSError as exc:
        raise OutputError(f"cannot write the audit page: {exc.strerror or exc}") from None
    return output
