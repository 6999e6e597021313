"""musicrfm evaluation: judging steered audio, independently of the probes that made the directions.

  checks     independent concept checks read from audio (pitch class, chord quality, tempo)
  metrics    Frechet distance and unbiased MMD^2 between embedding sets
  embedding  CLAP (when its weights are supplied) and the offline log-mel fallback
  evaluate   per-clip measurements: checks, the multiclass probe, traces over time
  sweep      the paper's protocols as resumable sweeps (`musicrfm eval sweep`)
"""
