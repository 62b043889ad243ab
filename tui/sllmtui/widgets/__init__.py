"""The TUI's panels, one widget per module."""
from .confirm import ConfirmScreen
from .event_log import EventLog
from .gpu_panel import GpuPanel
from .instances_table import InstancesTable
from .models_table import ModelsTable
from .nodes_table import NodesTable
from .rate_graph import RateGraph
from .requests_table import RequestsTable
from .status_line import StatusLine
from .throughput import ThroughputPanel
from .tier_bars import TierBars

__all__ = ["ConfirmScreen", "EventLog", "GpuPanel", "InstancesTable", "ModelsTable", "NodesTable", "RateGraph",
           "RequestsTable", "StatusLine", "ThroughputPanel", "TierBars"]
