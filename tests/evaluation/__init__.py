"""Tests of dist_ft.evaluation: the statistics of scored predictions."""
