"""The thin ipywidgets layer shared by every explorer: status line, progress bar, error box,
figure images and the guard that runs callbacks.

A callback that raises is never swallowed: the explorer shows the error in a red box, appends it
to ``explorer.errors``, logs it on the ``workbench.widgets`` logger, and re-raises it inside the
explorer's ``log_output`` Output widget. In a Jupyter kernel that widget records the traceback
(an ``output_type: error`` entry in the saved widget state, which the notebook tests scan for);
outside a kernel the exception propagates to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from ._common import error_html, figure_png, logger, status_html


class Explorer(widgets.VBox):
    """Base of the explorers: a VBox with status, progress, error box and log Output."""

    def __init__(self, title: str, **kwargs: Any):
        self.title = widgets.HTML(f"<b>{title}</b>")
        self.status = widgets.HTML(status_html("starting"))
        self.progress = widgets.IntProgress(value=0, min=0, max=100, description="",
                                            layout=widgets.Layout(width="180px",
                                                                  visibility="hidden"))
        self.error_box = widgets.HTML("")
        self.log_output = widgets.Output(layout=widgets.Layout(max_height="220px",
                                                               overflow="auto"))
        self.errors: list[BaseException] = []
        self._quiet = 0
        super().__init__(**kwargs)

    # ----------------------------------------------------------------- layout
    def header(self) -> widgets.Widget:
        """Title, status line and progress bar in one row."""
        for w in (self.title, self.status):
            w.layout.margin = "0 12px 0 0"
        return widgets.HBox([self.title, self.status, self.progress],
                            layout=widgets.Layout(align_items="center"))

    def footer(self) -> list[widgets.Widget]:
        return [self.error_box, self.log_output]

    def text_controls(self, text: str, height: str = "60px", label: str = "Run") -> None:
        """The prompt box and its run button, shared by every explorer."""
        self.text = widgets.Textarea(value=text, continuous_update=False,
                                     layout=widgets.Layout(width="100%", height=height))
        self.run_button = widgets.Button(description=label, button_style="primary",
                                         icon="play")

    @staticmethod
    def image(width: str | None = None) -> widgets.Image:
        """An empty PNG image widget for a figure."""
        layout = widgets.Layout(max_width="100%", height="auto", align_self="flex-start")
        if width:
            layout.width = width
        return widgets.Image(format="png", layout=layout)

    @staticmethod
    def show(image: widgets.Image, fig: Figure) -> None:
        """Render ``fig`` into ``image``."""
        image.value = figure_png(fig)

    # ----------------------------------------------------------------- progress and errors
    def report(self, fraction: float, message: str) -> None:
        """Progress callback handed to the states: fraction in [0, 1] and a message; the bar
        hides again at 1."""
        self.progress.value = int(round(100 * max(0.0, min(1.0, fraction))))
        self.progress.layout.visibility = "visible" if fraction < 1 else "hidden"
        self.status.value = status_html(message, busy=fraction < 1)

    def guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` as the explorer's reaction to a user action (module doc: errors)."""
        self.status.value = status_html(f"{what}…", busy=True)
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            self.errors.append(err)
            self.error_box.value = error_html(what, err)
            self.status.value = status_html(f"failed: {what}")
            self.progress.layout.visibility = "hidden"
            logger.error("%s failed: %s: %s", what, type(err).__name__, err)
            with self.log_output:
                raise
            return None
        self.error_box.value = ""
        self.progress.layout.visibility = "hidden"
        self.status.value = status_html("ready")
        return result

    def callback(self, what: str, fn: Callable[[], Any]) -> Callable[..., None]:
        """A widget callback (``observe`` change or button click) that runs ``fn`` guarded;
        ignored while the explorer itself updates its controls (:meth:`quiet`)."""
        def run(*_: Any) -> None:
            if not self._quiet:
                self.guard(what, fn)
        return run

    def bind(self, widget: widgets.Widget, what: str, setter: str) -> None:
        """On a change of ``widget``'s value, pass it to the state method named ``setter`` and
        redraw with :meth:`refresh`, guarded like every callback."""
        def apply() -> None:
            getattr(self.state, setter)(widget.value)
            self.refresh()
        widget.observe(self.callback(what, apply), "value")

    def run_text(self) -> None:
        """Run the state on the prompt box's text and redraw (the run button's action)."""
        self.state.set_text(self.text.value)
        self.refresh()

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Change controls programmatically without triggering their callbacks."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1
