"""`rain view`: a RAIN trace (`rain generate --trace`) as one offline HTML page.

A trace holds the whole search tree at every committed step, which is hard to read as JSON.
The page shows the answer as the path of committed token sets and, per step, the tree the
search built, as nested native <details> elements: subtrees fold, the page works without
JavaScript and without a network, and the file can be mailed or archived as it is.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from rain_llm.errors import RainError

Node = dict[str, Any]

# ---------------------------------------------------------------------------- loading

Keys = dict[str, tuple[type, ...]]
_NUMBER = (int, float)
# What the page needs (required) and what it shows when present (optional, checked when there).
_TOP: tuple[Keys, Keys] = ({"prompt": (str,), "text": (str,), "steps": (list,)},
                           {"model": (str,), "config": (dict,), "stats": (dict,)})
_STEP: tuple[Keys, Keys] = ({"committed": (list,), "tree": (dict,)},
                            {"step": (int,), "iterations": (int,), "visits_before": (int,), "committed_text": (str,)})
_NODE: tuple[Keys, Keys] = ({"tokens": (list,), "text": (str,), "visits": _NUMBER, "value": _NUMBER,
                             "prior": _NUMBER, "children": (list,)},
                            {"n": _NUMBER, "similarity_updates": (int,), "dynamic": (bool,)})
MAX_DEPTH = 200  # far deeper than any search tree; keeps the recursive renderer within Python's stack
_TYPE_NAMES = {list: "a list", dict: "an object", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def load_trace(path: str | Path) -> dict[str, Any]:
    """Read and check a trace file; every problem is one RainError line naming the file, so a
    wrong or damaged file is reported before any HTML is written."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise RainError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise RainError(f"{name}: is a folder, not a trace file") from None
    except OSError as err:
        raise RainError(f"{name}: cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RainError(f"{name}: not a text file (not UTF-8), so not a RAIN trace") from None
    if not text.strip():
        raise RainError(f"{name}: empty file, not a RAIN trace")
    try:
        trace = json.loads(text)
    except json.JSONDecodeError as err:
        if _looks_truncated(text, err):
            raise RainError(f"{name}: truncated JSON (the file ends at line {text.count(chr(10)) + 1} "
                            "in the middle of the trace; was the run interrupted?)") from None
        raise RainError(f"{name}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise RainError(f"{name}: JSON nested too deeply to be a RAIN trace") from None
    problem = _trace_problem(trace)
    if problem:
        raise RainError(f"{name}: not a RAIN trace ({problem})")
    return trace


def _looks_truncated(text: str, err: json.JSONDecodeError) -> bool:
    """True when the parser stopped because the text ran out, not because of a wrong character."""
    rest = text[err.pos:].strip()
    return (not rest or err.msg.startswith("Unterminated string")
            or any(word.startswith(rest) for word in ("true", "false", "null"))
            or re.fullmatch(r"-?[0-9.eE+-]*", rest) is not None
            or (err.msg.startswith("Invalid \\u") and re.fullmatch(r"u[0-9a-fA-F]{0,4}", rest) is not None))


def _trace_problem(trace: Any) -> str | None:
    """What keeps `trace` from being a trace, in a few words (None if nothing)."""
    if not isinstance(trace, dict):
        return f"the top level is {_type_name(trace)}, not an object"
    problem = _keys_problem(trace, _TOP, "")
    if problem:
        return problem
    for i, step in enumerate(trace["steps"]):
        where = f"steps[{i}]"
        if not isinstance(step, dict):
            return f"{where} is {_type_name(step)}, not an object"
        problem = _keys_problem(step, _STEP, where)
        if problem:
            return problem
        stack: list[tuple[Any, str, int]] = [(step["tree"], f"{where}.tree", 0)]
        while stack:  # a stack, not recursion: a tree from a file may be arbitrarily deep
            node, at, depth = stack.pop()
            if not isinstance(node, dict):
                return f"{at} is {_type_name(node)}, not an object"
            if depth > MAX_DEPTH:
                return f"{where}.tree is deeper than {MAX_DEPTH} levels"
            problem = _keys_problem(node, _NODE, at)
            if problem:
                return problem
            stack.extend((child, f"{at}.children[{j}]", depth + 1) for j, child in enumerate(node["children"]))
    return None


def _keys_problem(obj: dict[str, Any], keys: tuple[Keys, Keys], where: str) -> str | None:
    required, optional = keys
    for key, types in (required | optional).items():
        if key not in obj:
            if key in optional:
                continue
            return f"no {key!r}" + (f" in {where}" if where else "")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"{where + '.' if where else ''}{key} is {_type_name(value)}, not {_TYPE_NAMES[types[0]]}"
    return None


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------- counting


def tree_counts(tree: Node) -> dict[str, int]:
    """Nodes (root included), dynamic additions, similarity updates and depth of one step's tree:
    the per-step summary is derived from the tree itself, so it matches what is drawn."""
    counts = {"nodes": 0, "dynamic": 0, "similarity_updates": 0, "depth": 0}
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        counts["nodes"] += 1
        counts["dynamic"] += bool(node.get("dynamic", False))
        counts["similarity_updates"] += int(node.get("similarity_updates", 0))
        counts["depth"] = max(counts["depth"], depth)
        stack.extend((child, depth + 1) for child in node["children"])
    return counts


def committed_child(step: dict[str, Any]) -> Node | None:
    """The root's child whose tokens were committed at this step (None if the trace lacks it)."""
    return next((c for c in step["tree"]["children"] if c["tokens"] == step["committed"]), None)


# ---------------------------------------------------------------------------- text

# Whitespace and invisible characters, shown as marks inside token sets where a leading space or a
# newline is exactly what distinguishes two candidates.
_INVISIBLE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]+")
_MARKS = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍", "\xa0": "⍽"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def esc(text: Any) -> str:
    """HTML-escaped text; lone surrogates (possible in JSON strings) become U+FFFD so the page
    can always be written as UTF-8."""
    return html.escape(_SURROGATE.sub("\ufffd", str(text)), quote=True)


def visible(text: str) -> str:
    """A token set's text as HTML with spaces, newlines and invisible characters made visible."""
    parts = _INVISIBLE.split(text)
    runs = _INVISIBLE.findall(text)
    out = [esc(parts[0])]
    for run, after in zip(runs, parts[1:]):
        marks = "".join(_MARKS.get(ch, f"⟨U+{ord(ch):04X}⟩") for ch in run)
        out.append(f'<i class="ws">{marks}</i>{esc(after)}')
    return "".join(out)


def prose(text: str) -> str:
    """Running text (prompt, answer) as HTML: wrapped normally, newlines marked and kept."""
    return esc(text).replace("\n", '<i class="ws">↵</i>\n')


def _count(n: float) -> str:
    """A visit count that may carry fractional similarity credit: 5, 5.2."""
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


# ---------------------------------------------------------------------------- page

SETTINGS = ["method", "t_max", "t_min", "fresh_iterations", "value_threshold", "max_new_tokens",
            "token_set_lengths", "num_candidates", "template", "value_mode", "c_puct",
            "similarity_threshold", "parallel_leaves", "seed"]
STATS = ["committed_steps", "iterations", "rewinds", "nodes", "similarity_updates", "dynamic_additions",
         "answer_tokens", "completed_tokens", "budget_stopped", "seconds"]


def render_html(trace: dict[str, Any]) -> str:
    """The whole page: header, answer path, one folding tree per committed step, legend."""
    steps = trace["steps"]
    title = trace["prompt"].strip().splitlines()[0][:80] if trace["prompt"].strip() else "(empty prompt)"
    body = "\n".join([_header(trace), _answer_path(trace), _toolbar(), _legend()]
                     + [_step(i, steps) for i in range(len(steps))]
                     + ([] if steps else ['<p class="empty">No search steps in this trace '
                                          f'(method {esc(trace.get("config", {}).get("method", "?"))}).</p>']))
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>RAIN trace: {esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
            f'<body>\n<div class="page">\n{body}\n</div>\n<script>{SCRIPT}</script>\n</body>\n</html>\n')


def _header(trace: dict[str, Any]) -> str:
    """Prompt, model, final answer, and the settings and totals that explain the run's shape."""
    config = trace.get("config") or {}
    stats = trace.get("stats") or {}
    settings = "".join(_chip(key, config[key]) for key in SETTINGS if key in config)
    totals = "".join(_chip(key.replace("_", " "), stats[key]) for key in STATS
                     if key in stats and not (key == "completed_tokens" and not stats[key]))
    compute = stats.get("compute")
    total = compute.get("total") if isinstance(compute, dict) else None
    if isinstance(total, dict):
        totals += _chip("forward passes", total.get("forward_passes")) + _chip("tokens computed", total.get("tokens"))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in config.items())
    all_settings = f"<details class=\"all\"><summary>all settings</summary><table>{rows}</table></details>" \
        if rows else ""
    return (f'<header>\n<h1>RAIN trace</h1>\n<dl class="meta">'
            f'<dt>prompt</dt><dd class="prose">{prose(trace["prompt"])}</dd>'
            f'<dt>model</dt><dd>{esc(trace.get("model", "?"))}</dd>'
            f'<dt>answer</dt><dd class="prose answer">{prose(trace["text"])}</dd></dl>\n'
            + (f'<div class="chips"><span class="label">settings</span>{settings}</div>\n' if settings else "")
            + (f'<div class="chips"><span class="label">run</span>{totals}</div>\n' if totals else "")
            + f"{all_settings}\n</header>")


def _chip(key: str, value: Any) -> str:
    shown = ",".join(map(str, value)) if isinstance(value, list) else value
    return f'<span class="chip"><span class="k">{esc(key)}</span> {esc(shown)}</span>'


def _answer_path(trace: dict[str, Any]) -> str:
    """The answer as the sequence of committed token sets, each linking to its step."""
    segments = []
    for i, step in enumerate(trace["steps"]):
        text = _committed_text(step)
        segments.append(f'<a class="seg s{i % 2}" href="#step-{i + 1}" title="step {i + 1}: '
                        f'{step.get("iterations", 0)} iterations">{prose(text)}</a>')
    searched = "".join(_committed_text(step) for step in trace["steps"])
    if trace["text"].startswith(searched) and len(trace["text"]) > len(searched):
        segments.append('<span class="seg tail" title="written by plain decoding after the search budget ran out">'
                        f'{prose(trace["text"][len(searched):])}</span>')
    if not segments:
        segments.append(f'<span class="seg">{prose(trace["text"])}</span>')
    return ('<section class="path"><h2>Answer path <small>one box per committed token set; '
            'click one to go to its step</small></h2>\n'
            f'<p class="prose">{"".join(segments)}</p></section>')


def _committed_text(step: dict[str, Any]) -> str:
    if isinstance(step.get("committed_text"), str):
        return step["committed_text"]
    child = committed_child(step)
    return child["text"] if child else ""


def _toolbar() -> str:
    """Controls that need JavaScript; hidden until the script runs, so nothing dead shows without it."""
    return ('<nav class="toolbar js-only">'
            '<button type="button" data-act="expand">expand all</button>'
            '<button type="button" data-act="collapse">collapse all</button>'
            '<button type="button" data-act="reset">committed path only</button>'
            '<label>find <input type="search" id="find" placeholder="text in a token set"></label>'
            '<span id="hits"></span></nav>')


def _legend() -> str:
    return ('<p class="legend"><span class="cm-key">✓ committed</span> the token set chosen at that step '
            '&nbsp; <span class="badge dyn">+dyn</span> added dynamically during the search '
            '&nbsp; <span class="badge sim">sim N</span> similarity updates received '
            '&nbsp; <i class="ws">·</i> space <i class="ws">↵</i> newline '
            '&nbsp; bars: share of the parent\'s visits / prior; q: red &lt; 0 &lt; green. '
            'Children are in the order the search created them.</p>')


def _step(i: int, steps: list[dict[str, Any]]) -> str:
    """One committed step: summary line, the answer so far with this step's set marked, the tree."""
    step = steps[i]
    tree = step["tree"]
    counts = tree_counts(tree)
    iterations = step.get("iterations", 0)
    before = "".join(_committed_text(s) for s in steps[:i])
    text = _committed_text(step)
    summary = (f'<span class="no">step {i + 1}</span><span class="tok">{visible(text)}</span>'
               f'<span class="facts">{iterations} iterations = {iterations} rewinds · '
               f'{step.get("visits_before", 0)} visits before · {counts["nodes"]} nodes · depth {counts["depth"]} · '
               f'{counts["dynamic"]} dynamic additions · {counts["similarity_updates"]} similarity updates</span>')
    committed = committed_child(step)
    rows = _node(tree, committed, tree["visits"], root=True)
    return (f'<details class="step" id="step-{i + 1}" data-step="{esc(step.get("step", i))}" '
            f'data-nodes="{counts["nodes"]}" open>\n<summary>{summary}</summary>\n'
            f'<div class="head"><p class="sofar prose"><span class="before">{prose(before)}</span>'
            f'<mark>{prose(text)}</mark></p>'
            '<div class="tools js-only"><button type="button" data-act="expand">expand</button>'
            '<button type="button" data-act="collapse">collapse</button>'
            '<button type="button" data-act="reset">committed only</button></div></div>\n'
            '<div class="cols"><span class="txt">token set</span><span class="num v">visits</span>'
            '<span class="num n">n</span><span class="num q">q</span><span class="num p">prior</span>'
            '<span class="num s">sim</span><span class="num d">dyn</span></div>\n'
            f'<ul class="tree">{rows}</ul>\n</details>')


def _node(node: Node, committed: Node | None, parent_visits: float, root: bool = False) -> str:
    """One node and its subtree. Only the root and the committed child start open, so a large tree
    reads as the committed path with the alternatives one click away."""
    is_committed = node is committed
    classes = "node" + (" root" if root else "") + (" cm" if is_committed else "") \
        + (" dy" if node.get("dynamic") else "")
    tokens = " ".join(map(str, node["tokens"]))
    label = visible(node["text"]) if node["text"] else '<span class="start">(start of the answer)</span>'
    mark = '<span class="mk">✓</span>' if is_committed else ""
    if root:
        mark = '<span class="rk">root</span>'
        label = f"…{label}" if node["text"] else label
    row = (f'<span class="txt">{mark}<span class="tok">{label}</span></span>'
           + _cells(node, parent_visits))
    title = f'tokens: {tokens}' if tokens else "root: nothing committed yet"
    children = node["children"]
    if not children:
        return f'<li><div class="{classes} leaf" title="{esc(title)}">{row}</div></li>'
    opened = root or is_committed
    inner = "".join(_node(child, committed if root else None, node["visits"]) for child in children)
    attrs = ' open data-d=""' if opened else ""
    return (f'<li><details{attrs}><summary class="{classes}" title="{esc(title)}">{row}</summary>'
            f'<ul>{inner}</ul></details></li>')


def _cells(node: Node, parent_visits: float) -> str:
    """Visits (with a bar: share of the parent's visits), n, q (coloured), prior (bar), badges."""
    visits = node["visits"]
    share = min(1.0, visits / parent_visits) if parent_visits else 0.0
    q = float(node["value"])
    prior = float(node["prior"])
    if visits:
        strength = min(1.0, abs(q))
        tint = f"rgba(22,163,74,{0.12 + 0.5 * strength:.2f})" if q > 0 else \
            f"rgba(220,38,38,{0.12 + 0.5 * strength:.2f})" if q < 0 else "rgba(120,120,120,.12)"
        q_cell = f'<span class="num q" style="background:{tint}">{q:+.3f}</span>'
    else:
        q_cell = '<span class="num q un">–</span>'
    sims = int(node.get("similarity_updates", 0))
    return (f'<span class="num v" style="--w:{share * 100:.0f}%">{visits}</span>'
            f'<span class="num n">{_count(float(node.get("n") or visits))}</span>{q_cell}'
            f'<span class="num p" style="--w:{min(1.0, max(0.0, prior)) * 100:.0f}%">{prior:.3f}</span>'
            f'<span class="num s">{f"<span class=badge>sim {sims}</span>" if sims else ""}</span>'
            f'<span class="num d">{"<span class=badge>+dyn</span>" if node.get("dynamic") else ""}</span>')


def write_view(trace_path: str | Path, out: str | Path | None = None) -> Path:
    """`rain view`: check the trace, render it, write the page (default: next to it, .html)."""
    trace = load_trace(trace_path)
    target = Path(out) if out else Path(trace_path).with_suffix(".html")
    if target.resolve() == Path(trace_path).resolve():
        raise RainError(f"{target}: would overwrite the trace itself; give another output with -o")
    return write_html(trace, target)


def write_html(trace: dict[str, Any], target: str | Path) -> Path:
    """Write the page through a temporary file so a reader never sees half a page."""
    target = Path(target)
    if not target.resolve().parent.is_dir():
        raise RainError(f"cannot write {target}: folder {target.resolve().parent} does not exist")
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(render_html(trace), encoding="utf-8")
        tmp.replace(target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RainError(f"cannot write {target}: {err.strerror or err}") from None
    return target


# ---------------------------------------------------------------------------- style and script

CSS = """
:root { --fg:#1f2328; --dim:#6e7781; --line:#d0d7de; --bg:#fff; --soft:#f6f8fa; --accent:#0969da;
  --cm:#1a7f37; --cmbg:#dafbe1; --seg0:#ddf4ff; --seg1:#fff1c2; --bar:#b6d4fe; --pbar:#e3d8fc; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:var(--bg);
  font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
.page { max-width:1180px; margin:0 auto; padding:18px 22px 60px; }
h1 { font-size:20px; margin:0 0 10px; }
h2 { font-size:15px; margin:18px 0 6px; }
h2 small { font-weight:normal; color:var(--dim); font-size:12px; margin-left:6px; }
.meta { display:grid; grid-template-columns:70px 1fr; gap:4px 12px; margin:0 0 10px; }
.meta dt { color:var(--dim); font-size:12px; padding-top:2px; }
.meta dd { margin:0; }
.prose { white-space:pre-wrap; overflow-wrap:anywhere; }
.answer { font-weight:500; }
.chips { display:flex; flex-wrap:wrap; gap:5px; margin:4px 0; align-items:center; }
.chips .label { color:var(--dim); font-size:12px; width:70px; }
.chip { background:var(--soft); border:1px solid var(--line); border-radius:10px; padding:0 8px; font-size:12px; }
.chip .k { color:var(--dim); }
details.all { margin:6px 0 0 82px; font-size:12px; }
details.all summary { color:var(--accent); cursor:pointer; }
details.all table { border-collapse:collapse; margin-top:4px; }
details.all th, details.all td { text-align:left; padding:1px 10px 1px 0; font-weight:normal;
  font-family:ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
details.all th { color:var(--dim); }
.path p { margin:0; padding:8px 10px; border:1px solid var(--line); border-radius:6px; line-height:1.9; }
.seg { color:inherit; text-decoration:none; border-radius:3px; padding:1px 0; }
.seg.s0 { background:var(--seg0); } .seg.s1 { background:var(--seg1); }
.seg:hover { outline:2px solid var(--accent); }
.seg.tail { color:var(--dim); font-style:italic; }
i.ws { color:#afb8c1; font-style:normal; }
.toolbar { position:sticky; top:0; z-index:2; background:rgba(255,255,255,.95); padding:6px 0;
  border-bottom:1px solid var(--line); gap:6px; align-items:center; margin-top:14px; }
.js-only { display:none; }
body.js .js-only { display:flex; }
button { font:inherit; font-size:12px; padding:2px 9px; border:1px solid var(--line); border-radius:5px;
  background:var(--soft); cursor:pointer; }
button:hover { background:#eaeef2; }
.toolbar label { font-size:12px; color:var(--dim); margin-left:10px; }
.toolbar input { font:inherit; font-size:12px; padding:2px 6px; width:220px; }
#hits { font-size:12px; color:var(--dim); }
.legend { font-size:12px; color:var(--dim); margin:8px 0 4px; }
.cm-key { color:var(--cm); font-weight:600; }
.badge { display:inline-block; font-size:11px; line-height:1.3; padding:0 4px; border-radius:4px;
  background:#fff8c5; color:#7d4e00; border:1px solid #eed888; }
.badge.dyn, .d .badge { background:#fbefff; color:#8250df; border-color:#e3c9f7; }
details.step { border:1px solid var(--line); border-radius:8px; margin:12px 0; background:var(--bg); }
details.step:target { box-shadow:0 0 0 3px #54aeff66; }
details.step > summary { display:flex; flex-wrap:wrap; gap:4px 12px; align-items:baseline; padding:7px 12px;
  background:var(--soft); border-radius:8px; cursor:pointer; list-style:none; }
details.step[open] > summary { border-bottom:1px solid var(--line); border-radius:8px 8px 0 0; }
details.step > summary::-webkit-details-marker { display:none; }
details.step > summary::before { content:"▸"; color:var(--dim); }
details.step[open] > summary::before { content:"▾"; }
.step > summary .no { font-weight:600; }
.step > summary .tok { font-family:ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  background:var(--cmbg); color:var(--cm); padding:0 5px; border-radius:4px; font-weight:600; white-space:pre; }
.step > summary .facts { color:var(--dim); font-size:12px; }
.head { display:flex; gap:12px; align-items:flex-start; margin:8px 12px; }
.sofar { flex:1; margin:0; font-size:13px; }
.sofar .before { color:var(--dim); }
.sofar mark { background:var(--cmbg); color:var(--cm); font-weight:600; border-radius:3px; }
.tools { gap:5px; flex:none; }
.cols, .node { display:flex; align-items:center; gap:0;
  font:12.5px/1.55 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.cols { color:var(--dim); font-size:11px; margin:0 12px; border-bottom:1px solid var(--line); padding-left:16px; }
.txt { flex:1; min-width:0; overflow:hidden; text-overflow:ellipsis; white-space:pre; }
.num { flex:none; width:64px; text-align:right; padding:0 6px; }
.num.v { width:84px; background:linear-gradient(to right, var(--bar) var(--w), transparent var(--w)); }
.node .num.v { background-size:100% 70%; background-repeat:no-repeat; background-position:center; }
.num.p { width:70px; background:linear-gradient(to right, var(--pbar) var(--w), transparent var(--w));
  background-size:100% 70%; background-repeat:no-repeat; background-position:center; }
.cols .num { background:none; }
.num.s, .num.d { width:58px; }
.num.q { width:72px; border-radius:3px; }
.num.q.un { color:#afb8c1; }
ul.tree { list-style:none; margin:4px 12px 12px; padding:0; }
ul.tree ul { list-style:none; margin:0 0 0 7px; padding:0 0 0 12px; border-left:1px dotted #c4ccd4; }
.node { padding:0 0 0 5px; border-radius:3px; }
.node:hover { background:#f3f6f9; }
summary.node { cursor:pointer; list-style:none; }
summary.node::-webkit-details-marker { display:none; }
.node::before { content:"▸"; flex:none; width:14px; color:var(--dim); }
details[open] > summary.node::before { content:"▾"; }
.node.leaf::before { content:""; }
.node.root .tok { color:var(--dim); }
.rk { color:var(--dim); font-size:10px; margin-right:6px; border:1px solid var(--line); border-radius:3px;
  padding:0 3px; }
.start { color:var(--dim); font-style:italic; }
.node.cm { background:var(--cmbg); box-shadow:inset 3px 0 0 var(--cm); }
.node.cm .tok { color:var(--cm); font-weight:700; }
.mk { color:var(--cm); font-weight:700; margin-right:5px; }
.node.dy .tok { color:#8250df; }
.node.hit { background:#fff8c5; outline:1px solid #d4a72c; }
.empty { color:var(--dim); }
"""

SCRIPT = """
(function () {
  "use strict";
  document.body.classList.add("js");
  function scopeOf(button) { return button.closest("details.step") || document; }
  function trees(scope) { return scope.querySelectorAll("ul.tree details"); }
  function act(name, scope) {
    if (name === "expand") {
      if (scope === document) scope.querySelectorAll("details.step").forEach(function (d) { d.open = true; });
      trees(scope).forEach(function (d) { d.open = true; });
    } else if (name === "collapse") {
      trees(scope).forEach(function (d) { d.open = false; });
    } else {
      trees(scope).forEach(function (d) { d.open = d.hasAttribute("data-d"); });
    }
  }
  document.querySelectorAll("button[data-act]").forEach(function (b) {
    b.addEventListener("click", function () { act(b.getAttribute("data-act"), scopeOf(b)); });
  });
  var find = document.getElementById("find"), hits = document.getElementById("hits");
  var unmark = { "\\u00b7": " ", "\\u21b5": "\\n", "\\u21e5": "\\t" };
  function plain(el) { return el.textContent.replace(/[\\u00b7\\u21b5\\u21e5]/g, function (c) { return unmark[c]; }); }
  find.addEventListener("input", function () {
    var query = find.value, count = 0;
    document.querySelectorAll(".node.hit").forEach(function (n) { n.classList.remove("hit"); });
    if (query) {
      document.querySelectorAll(".node").forEach(function (n) {
        var tok = n.querySelector(".tok");
        if (!tok || plain(tok).toLowerCase().indexOf(query.toLowerCase()) < 0) return;
        n.classList.add("hit");
        count += 1;
        for (var d = n.closest("li").parentElement.closest("details"); d; d = d.parentElement.closest("details")) {
          d.open = true;
        }
      });
    }
    hits.textContent = query ? count + " match" + (count === 1 ? "" : "es") : "";
  });
  document.body.setAttribute("data-ready", "1");
})();
"""
