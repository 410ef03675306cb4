"""Results objects and reports: per-token and per-layer tables, JSON round
trip, matplotlib plots and a self-contained HTML report."""

from .analysis import Analysis, analyze, analyze_batch, path_milestones
from .html import analysis_html, report_html
from .plots import plot_branch_fractions, plot_branch_weights, plot_token_heatmap

__all__ = ["Analysis", "analyze", "analyze_batch", "path_milestones", "analysis_html", "report_html",
           "plot_branch_fractions", "plot_branch_weights", "plot_token_heatmap"]
