"""musicrfm evaluation: judging steered audio, independently of the probes that made the directions.

  audio_checks  independent checks of audio by signal processing alone (pitch class, chord quality, tempo,
                interval, scale mode, pulses per bar, chord progression): no MusicGen, no probe; what a clip
                sounds like
  metrics       Frechet distance and unbiased MMD^2 between embedding sets
  embedding     CLAP (when its weights are supplied) and the offline log-mel fallback
  measure       per-clip measurements of a generated clip: its audio check (the concept -> check map), the
                multiclass probe's (tempo: the regressor's) reading of MusicGen features re-extracted from it,
                traces over time
  presets       the paper's protocols as data: presets, SweepSettings, how a preset expands into units
  run           the sweep's driver (`musicrfm eval sweep`): units, resumable units.jsonl, local or Ray fan-out
  report        a sweep's outputs from its records: results.csv, clips.csv, traces, plots, summary.md

Not to be confused with probes.classification (`musicrfm report`: how well the probes classify the
training features) or mini.health (`musicrfm mini check`: the bundled model's own health checks).
"""
