"""Views of results: figures (`plots`), the demo report (`report`), neuron dashboards (`dashboard`) and
exports for other tools (`neuronpedia`). They read saved results and never run a model."""

from tl_skill.viz.dashboard import write_dashboard
from tl_skill.viz.neuronpedia import export_neuronpedia
from tl_skill.viz.report import write_report

__all__ = ["export_neuronpedia", "write_dashboard", "write_report"]
