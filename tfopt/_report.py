"""One report convention: a table for people, `to_dict()` for programs.

Every technique has a ``*_report`` function returning a `Report`; ``print(report)`` shows its table and
``report.to_dict()`` gives plain data (``{"layers": [...rows], **totals}``).
"""


def render_table(header, rows, footer=(), right=()):
    """Text table: `header`, a rule, `rows`, and (after a second rule) `footer` rows.

    Args:
        header: column titles.
        rows, footer: sequences of cells (anything `str` accepts).
        right: indices of the right-aligned (numeric) columns.
    """
    body = [[str(c) for c in r] for r in (header, *rows, *footer)]
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(body[0]), rule, *map(line, body[1 : 1 + len(rows)])]
    if footer:
        out += [rule, *map(line, body[1 + len(rows) :])]
    return "\n".join(out)


class Report:
    """Base of the reports: per-layer `rows` (dicts), totals named in `totals`, a table.

    A subclass sets `header` and `right` and implements `_cells(row)` (one table line per row) and,
    optionally, `_footer()` (the total lines).
    """

    header = ()
    right = ()
    totals = ()  # attribute names that `to_dict` adds next to "layers"
    summed = ()  # row keys whose totals become attributes of the same name

    def __init__(self, rows):
        self.rows = rows
        for key in self.summed:
            setattr(self, key, sum(r[key] for r in rows))

    def _cells(self, row):
        raise NotImplementedError

    def _footer(self):
        return ()

    def to_dict(self):
        return {"layers": [dict(r) for r in self.rows], **{k: getattr(self, k) for k in self.totals}}

    def __str__(self):
        return render_table(self.header, [self._cells(r) for r in self.rows], self._footer(), self.right)

    __repr__ = __str__
