"""Plan stage: stream a detection JSON in bounded memory, validate it, cut it into shards."""

from tasks.stages.plan.detections import file_checksum, read_categories
from tasks.stages.plan.shards import plan_shards

__all__ = ["file_checksum", "plan_shards", "read_categories"]
