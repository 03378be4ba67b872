"""HTML for the generated tokens (coloured by the probability the library recorded, the first
divergence between A and B outlined, each token clickable) and the results as JSON."""

from __future__ import annotations

import html
import math

from gemma3_lab.app.ui.session import ColumnRun, Session
from gemma3_lab.generate import GenerationResult

# JavaScript for the token strips: a click (or Enter) on a token sends its column and step
# index to Python as a `select` event (gr.SelectData.index / .value); a prompt token sends
# value "A:<slot>". Tokens are focusable; arrow keys, Home and End move the inspected token.
CLICK_JS = """
const pick = (t) => {
  element.querySelectorAll('.sel').forEach((s) => s.classList.remove('sel'));
  t.classList.add('sel');
  if (t.dataset.p !== undefined) trigger('select', {index: null, value: t.dataset.col + ':' + t.dataset.p});
  else trigger('select', {index: parseInt(t.dataset.i), value: t.dataset.col});
};
element.addEventListener('click', (e) => {
  const t = e.target.closest('[data-i], [data-p]');
  if (t) pick(t);
});
element.addEventListener('keydown', (e) => {
  const t = e.target.closest('[data-i], [data-p]');
  if (!t) return;
  const all = [...element.querySelectorAll('[data-i], [data-p]')];
  const k = all.indexOf(t);
  const to = {ArrowRight: k + 1, ArrowDown: k + 1, ArrowLeft: k - 1, ArrowUp: k - 1, Home: 0,
              End: all.length - 1}[e.key];
  if (to !== undefined) {
    e.preventDefault();
    const n = all[Math.max(0, Math.min(all.length - 1, to))];
    n.focus();
    pick(n);
  } else if (e.key === 'Enter' || e.key === ' ') {
    e.preventDefault();
    pick(t);
  }
});
"""

# Ctrl+Enter (Cmd+Enter on a Mac) anywhere on the page presses Generate; installed once.
KEYS_HTML = "<span hidden></span>"
KEYS_JS = """
if (!window.__g3Keys) {
  window.__g3Keys = true;
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !e.repeat) {
      const b = document.querySelector('#generate');
      if (b) { e.preventDefault(); b.click(); }
    }
  });
}
"""

PROMPT_SHOWN = 256  # prompt tokens a strip shows (the last ones); the rest are counted

CSS = """
.g3-tokens { font-family: ui-monospace, monospace; font-size: 15px; line-height: 2.1; white-space: pre-wrap;
             word-break: break-word; min-height: 3em; max-height: 320px; overflow-y: auto; }
.g3-tokens .tok, .g3-tokens .ptok { border-radius: 4px; padding: 2px 1px; cursor: pointer; color: #111; }
.g3-tokens .ptok { color: #555; background: #eceff3; }
.g3-tokens .tok:hover, .g3-tokens .ptok:hover, .g3-tokens [tabindex]:focus-visible { outline: 2px solid #333; }
.g3-tokens .sel { outline: 3px solid #1f4fd1; }
.g3-tokens .tok.div { outline: 3px dashed #c00; outline-offset: 1px; }
.g3-tokens .divmark { color: #c00; font-weight: bold; font-family: sans-serif; font-size: 12px; }
.g3-tokens .empty, .g3-tokens .more { color: #888; font-family: sans-serif; font-size: 12px; }
.g3-legend { font-family: sans-serif; font-size: 12px; display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.g3-legend .bar { width: 160px; height: 10px; border-radius: 3px;
                  background: linear-gradient(to right, hsl(0,75%,78%), hsl(60,75%,78%), hsl(120,75%,78%)); }
"""


def prob_color(p: float) -> str:
    """Red (p = 0) through yellow to green (p = 1)."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f},75%,78%)"


def shown(text: str) -> str:
    return text.replace("\n", "↵\n").replace("\t", "⇥")


def tokens_html(run: ColumnRun | None, col: str, divergence: int | None = None, selected: int | None = None) -> str:
    if run is None:
        return "<div class='g3-tokens'><span class='empty'>Press Generate.</span></div>"
    if run.error and not run.steps:
        return f"<div class='g3-tokens'><span class='empty'>{html.escape(run.error)}</span></div>"
    if not run.steps:
        return f"<div class='g3-tokens'><span class='empty'>{html.escape(run.status)}</span></div>"
    parts = prompt_parts(run, col)
    for i, s in enumerate(run.steps):
        text = s.text or s.token
        cls = "tok" + (" div" if i == divergence else "") + (" sel" if i == selected else "")
        title = (f"step {i} · position {s.position} · id {s.token_id} · {s.token!r} · "
                 f"p = {s.prob:.4f} (log p = {s.logprob:.3f})")
        mark = "<span class='divmark' title='A and B first differ here'>▼</span>" if i == divergence else ""
        parts.append(
            f"{mark}<span class='{cls}' tabindex='0' data-col='{col}' data-i='{i}' "
            f"style='background:{prob_color(s.prob)}' "
            f"title='{html.escape(title, quote=True)}'>{html.escape(shown(text))}</span>"
        )
    return f"<div class='g3-tokens' id='g3-tokens-{col}'>{''.join(parts)}</div>"


def prompt_parts(run: ColumnRun, col: str) -> list[str]:
    """The prompt's tokens in grey (the last PROMPT_SHOWN of them), each inspectable by slot."""
    pieces = run.prompt_pieces or []
    first = max(0, len(pieces) - PROMPT_SHOWN)
    parts = [f"<span class='more'>… {first:,} earlier prompt tokens · </span>"] if first else []
    for p in range(first, len(pieces)):
        title = f"prompt slot {p} · {pieces[p]!r} · click: the next-token distribution here"
        parts.append(f"<span class='ptok' tabindex='0' data-col='{col}' data-p='{p}' "
                     f"title='{html.escape(title, quote=True)}'>{html.escape(shown(pieces[p].replace('▁', ' ')))}</span>")
    return parts


LEGEND = (
    "<div class='g3-legend'>token colour = probability the model gave the chosen token: 0 "
    "<span class='bar'></span> 1 · <span style='outline:2px dashed #c00'>&nbsp;▼&nbsp;</span> first step where "
    "A and B differ · grey: the prompt · click a token (or focus it and use the arrow keys) to inspect it · "
    "Ctrl+Enter: Generate</div>"
)


def prompt_label(prompt, width: int = 40) -> str:
    """The prompt a status line belongs to, short: its text (a chat: the user's turn), quoted."""
    if isinstance(prompt, list):
        content = prompt[-1].get("content", "") if prompt else ""
        prompt = content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)
    text = " ".join(str(prompt or "").split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def status_md(run: ColumnRun | None, prompt=None) -> str:
    if run is None:
        return ""
    lines = [f"**{html.escape(run.describe or str(run.spec.model))}** · prompt {html.escape(prompt_label(prompt), quote=False)}",
             f"{run.spec.decoding.describe()}"
             + (" · pan-and-scan" if run.spec.pan_and_scan else "")]
    if run.spec.intervention is not None:
        lines.append(f"intervention: {html.escape(run.spec.intervention.describe())}")
    lines.append(("⚠ " if run.error else "") + html.escape(run.status))
    return "  \n".join(lines)


def divergence_md(session: Session) -> str:
    a, b = session.runs.get("A"), session.runs.get("B")
    if a is None or b is None or a.result is None or b.result is None:
        return ""
    return divergence_line(a.result, b.result)


def divergence_line(a: GenerationResult, b: GenerationResult) -> str:
    """Where A and B first chose differently, and how close each choice was: what each run's
    step record gave the other's token (from its recorded top k), in nats below its own."""
    d = a.first_divergence(b)
    if d is None:
        return f"A and B chose the same {len(a.steps)} tokens."
    if d >= min(len(a.steps), len(b.steps)):
        return f"A and B agree on their first {d} tokens; then one of them stops."
    sa, sb = a.steps[d], b.steps[d]

    def gave(who: str, s, other) -> str:
        if other.token_id not in s.top_k_ids:
            return f"{other.token!r} was not in {who}'s top {len(s.top_k_ids)}"
        p = s.top_k[s.top_k_ids.index(other.token_id)][1]
        gap = math.log(s.prob / p) if p > 0 and s.prob > 0 else float("inf")
        return f"{who} gave {other.token!r} p = {p:.4g}, {abs(gap):.2f} nats {'below' if gap >= 0 else 'above'} its choice"

    return (f"A and B first differ at step {d}: A chose {sa.token!r} (p = {sa.prob:.4g}), "
            f"B chose {sb.token!r} (p = {sb.prob:.4g}). {gave('A', sa, sb)}; {gave('B', sb, sa)}.")


def results_json(session: Session) -> dict:
    """What a script gets from the `generate` endpoint: text, ids and per-step probabilities."""
    out: dict = {"first_divergence": session.first_divergence()}
    for col, run in session.runs.items():
        res = run.result
        out[col] = {
            "model": run.spec.model.source,
            "precision": run.spec.model.precision,
            "text": res.text if res else "".join(s.text for s in run.steps),
            "token_ids": res.token_ids if res else [s.token_id for s in run.steps],
            "tokens": [s.token for s in run.steps],
            "probs": [round(s.prob, 6) for s in run.steps],
            "stop_reason": res.stop_reason if res else None,
            "prompt_tokens": run.n_prompt,
            "intervention": run.spec.intervention.describe() if run.spec.intervention is not None else None,
            "error": run.error,
            "done": res is not None or run.error is not None,
        }
    return out


TOPK_CSS = """
.g3-topk { border-collapse: collapse; font-size: 14px; width: 100%; }
.g3-topk td, .g3-topk th { padding: 3px 8px; text-align: left; }
.g3-topk .piece { font-family: ui-monospace, monospace; white-space: pre; }
.g3-topk .bar { display: inline-block; height: 10px; background: #5b8def; border-radius: 2px; vertical-align: middle; }
.g3-topk tr.chosen { background: #fff3c4; font-weight: 600; }
"""


def topk_html(step) -> str:
    """The step's recorded top-k under the model's own distribution (temperature 1, no
    filtering), the chosen token marked; exact probabilities, nothing rounded to 0 %."""
    if step is None:
        return "<p class='g3-empty'>Click a generated token.</p>"
    rows = []
    ids = list(step.top_k_ids)
    for rank, ((piece, p), i) in enumerate(zip(step.top_k, ids), 1):
        cls = " class='chosen'" if i == step.token_id else ""
        rows.append(f"<tr{cls}><td>{rank}</td><td class='piece'>{html.escape(repr(piece)[1:-1])}</td><td>{i}</td>"
                    f"<td>{p:.4f}</td><td><span class='bar' style='width:{max(p * 120, 1):.0f}px'></span></td></tr>")
    if step.token_id not in ids:
        rows.append(f"<tr class='chosen'><td>…</td><td class='piece'>{html.escape(repr(step.token)[1:-1])}</td>"
                    f"<td>{step.token_id}</td><td>{step.prob:.4f}</td><td>(sampled, outside the top {len(ids)})</td></tr>")
    return ("<table class='g3-topk'><tr><th>#</th><th>token</th><th>id</th><th>p</th><th></th></tr>"
            + "".join(rows) + "</table>")
