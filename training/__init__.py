"""Training: the ParaDiffusion model in three stages on DeepSpeed, export and generation."""

# paradiffusion.config composes this package's config sections, and they import its
# StrictModel: loading the core first makes `import training.config` work on its own.
import paradiffusion.config  # noqa: F401, E402
