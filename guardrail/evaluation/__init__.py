"""The evaluation harness: data readers, judges, unsafe rates per mode, representation metrics
and plots. Nothing in the engine imports it."""
