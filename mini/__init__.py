"""musicgen-mini: a small MusicGen trained here, on SynTheory audio, so steering can be proven offline.

  corpus.py   render the training corpus from MIDI (notes, chords, intervals; captions without pitch)
  codec.py    train an EnCodec-architecture codec (our own residual-VQ training)
  lm.py       train the text encoder + MusicGen decoder on the codec's tokens; assemble the model
  training.py resumable checkpoints and the time-bounded loop the codec and LM trainers share
  health.py   `musicrfm mini check`: the bundled model's own health checks (codec keeps the pitch class,
              generations have a dominant one, activation scale), measured with evaluation.audio_checks
  cli.py      `musicrfm mini corpus | codec | lm | export | check`

The trained model ships in engine/weights/musicgen-mini; `musicrfm.engine.model.load_model("musicgen-mini")`
loads it. docs/musicgen-mini.md holds the recipe and what each stage measured.
"""
