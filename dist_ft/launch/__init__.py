"""Launchers: Slurm environment, sweeps, submission through submitit, job status."""
