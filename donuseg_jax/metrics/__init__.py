"""Instance segmentation metrics, HoVer-Net-exact, and their dataset-level aggregation."""

from donuseg_jax.metrics.aggregate import aggregate
from donuseg_jax.metrics.aggregate import summarize
from donuseg_jax.metrics.instance import COUNT_NAMES
from donuseg_jax.metrics.instance import METRIC_NAMES
from donuseg_jax.metrics.instance import instance_counts
from donuseg_jax.metrics.instance import instance_metrics
from donuseg_jax.metrics.instance import metrics_from_counts

__all__ = ['COUNT_NAMES', 'METRIC_NAMES', 'aggregate', 'instance_counts', 'instance_metrics',
           'metrics_from_counts', 'summarize']
