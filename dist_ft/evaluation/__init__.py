"""Statistics of a clinical evaluation: bootstrap CIs, operating points, calibration, subgroups."""
