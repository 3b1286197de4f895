"""The chart of waits over the day, as SVG text: written here, without a plotting library at run time.

One dot per call that joined the queue in the window, at the local time it joined (x) and the seconds it waited
(y): filled when answered, hollow when the wait ended otherwise (abandoned, callback, escalated …); red for calls
that waited as emergencies. Dashed lines mark the service level threshold and the emergency target. Only times,
seconds and kinds are drawn: nothing that could identify a caller.
"""

from __future__ import annotations

import math
from datetime import tzinfo
from typing import Final
from xml.sax.saxutils import escape

from routing.statistics import StatsReport

__all__ = ["waits_svg"]

_W: Final = 960
_H: Final = 420
_LEFT: Final = 64
_RIGHT: Final = 24
_TOP: Final = 40
_BOTTOM: Final = 48
_NORMAL: Final = "#1f5fa8"
_EMERGENCY: Final = "#c0262d"


def _nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 × 10^n at least ``value`` (and at least 10 s), for a readable y axis."""
    value = max(value, 10.0)
    power = 10.0 ** math.floor(math.log10(value))
    return next(float(m * power) for m in (1, 2, 5, 10) if m * power >= value)


def waits_svg(report: StatsReport, zone: tzinfo) -> str:
    """The SVG document (UTF-8 text) of the report's waits; ``zone``: the hospital's, for the time axis."""
    start, end = report.start, report.end
    span = (end - start).total_seconds()
    settings = report.settings
    top = _nice_top(max([w for _, w, _, _ in report.waits] + [settings.service_level_seconds]))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(seconds: float) -> float:
        return _LEFT + plot_w * seconds / span

    def y(wait: float) -> float:
        return _TOP + plot_h * (1 - min(wait, top) / top)

    title = (
        f"等待时长 waits {start.astimezone(zone):%Y-%m-%d %H:%M} – {end.astimezone(zone):%Y-%m-%d %H:%M} "
        f"({len(report.waits)} calls)"
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
        'font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="white"/>',
        f'<text x="{_LEFT}" y="24" font-size="14">{escape(title)}</text>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for i in range(6):  # y ticks
        wait = top * i / 5
        parts.append(f'<text x="{_LEFT - 6}" y="{y(wait) + 4:.1f}" text-anchor="end">{wait:g} s</text>')
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(wait):.1f}" y2="{y(wait):.1f}" stroke="#eee"/>')
    ticks = 12 if span <= 86_400 * 1.5 else 8
    for i in range(ticks + 1):  # x ticks, in local time
        at = start + (end - start) * i / ticks
        label = at.astimezone(zone).strftime("%H:%M" if span <= 86_400 * 1.5 else "%m-%d %H:%M")
        px = x((at - start).total_seconds())
        parts.append(f'<text x="{px:.1f}" y="{_TOP + plot_h + 18}" text-anchor="middle">{label}</text>')
    for limit, colour, name in (
        (settings.service_level_seconds, _NORMAL, "服务水平 service level"),
        (settings.emergency_target_seconds, _EMERGENCY, "急救目标 emergency target"),
    ):
        if limit <= top:
            py = y(limit)
            parts.append(
                f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{py:.1f}" y2="{py:.1f}" stroke="{colour}" '
                'stroke-dasharray="6 4"/>'
            )
            parts.append(f'<text x="{_LEFT + plot_w - 4}" y="{py - 4:.1f}" text-anchor="end" fill="{colour}">'
                         f"{escape(name)} {limit:g} s</text>")  # fmt: skip
    for at, wait, emergency, end_kind in report.waits:
        colour = _EMERGENCY if emergency else _NORMAL
        fill = colour if end_kind == "answered" else "none"
        parts.append(
            f'<circle cx="{x((at - start).total_seconds()):.1f}" cy="{y(wait):.1f}" r="3.5" fill="{fill}" '
            f'stroke="{colour}"><title>{escape(end_kind)} {wait:.1f} s</title></circle>'
        )
    parts.append(
        f'<text x="{_LEFT}" y="{_H - 8}">● answered  ○ abandoned / other  '
        f'<tspan fill="{_EMERGENCY}">red: emergency</tspan></text>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
