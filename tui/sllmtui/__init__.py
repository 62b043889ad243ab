"""sllmtui: the terminal UI of sllmd (Textual), opened by `sllmtui` or `sllmctl top`.

Fed by the daemon's `watch` push stream (source.py), folded into a View (state.py),
shown by one widget per panel (widgets/), styled by sllmtui.tcss.
"""
