"""A model as a SavedModel for serving: one `serving_default` signature, named inputs.

Why not `model.save(path, save_format="tf")`: that legacy Keras format also traces and stores
every layer's call function so that Keras can rebuild the model from it, which took 10.6 s for
the trainer's tiny test model against 2.5 s for this export (AMD EPYC, 2 vCPUs;
`keras.Model.save` vs `keras.Model.export`, one run each). Rebuilding the Keras model is what
the `.keras` file is for; the SavedModel is for TF Serving, `tf.saved_model.load`, and
converters, which need only the signature and the weights.

The signature takes `text`, `audio`, `video` (features, or int32 token ids when the model
reads tokens) and `text_mask`, `audio_mask`, `video_mask` (bool, True = valid step), batch
size free, sequence lengths as the model was built; it returns `{"sentiment": (B, 1) float32}`.
"""

import tensorflow as tf

from msa_xla.options import MODALITIES

INPUT_NAMES = MODALITIES + tuple(f"{m}_mask" for m in MODALITIES)  # the model's input order
OUTPUT_NAME = "sentiment"


class _Serving(tf.Module):
    """The model's weights and one inference function; no Keras objects are tracked.

    The model is only captured by the function's closure: were it an attribute, the SavedModel
    writer would save it as a Keras object (the slow format above).
    """

    def __init__(self, model):
        super().__init__(name="msa_xla_serving")
        self.model_variables = list(model.variables)  # tracked: saved with the signature
        specs = [tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype, name=name)
                 for name, x in zip(INPUT_NAMES, model.example_inputs())]

        def serve(text, audio, video, text_mask, audio_mask, video_mask):
            inputs = (text, audio, video, text_mask, audio_mask, video_mask)
            return {OUTPUT_NAME: tf.cast(model(inputs, training=False), tf.float32)}

        self.serve = tf.function(serve, input_signature=specs, autograph=False)


def export_for_serving(model, path):
    """Writes `model` (an msa_xla model, built) to `path` (local, gs:// or ram://) as a
    SavedModel with a `serving_default` signature.

    Example:
      >>> import os, tempfile
      >>> from msa_xla import MSAModel
      >>> model = MSAModel(seq_len=4, text_dim=3, audio_dim=2, video_dim=2, model_dim=8,
      ...                  num_heads=2, ff_dim=8, n_layers_mod=1, n_layers_fuse=1)
      >>> _ = model(model.example_inputs(), training=False)
      >>> path = os.path.join(tempfile.mkdtemp(), "served")
      >>> export_for_serving(model, path)
      >>> serve = tf.saved_model.load(path).signatures["serving_default"]
      >>> sorted(serve.structured_input_signature[1])
      ['audio', 'audio_mask', 'text', 'text_mask', 'video', 'video_mask']
      >>> serve(**dict(zip(INPUT_NAMES, model.example_inputs(2))))["sentiment"].shape
      TensorShape([2, 1])
    """
    module = _Serving(model)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
