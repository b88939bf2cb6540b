"""Captioning: paragraph captions for the kept set with vision-language models (`make caption`),
and ParaImage-Small selection and annotation (``captioning.small``)."""

# paradiffusion.config composes this package's config sections, and they import its
# StrictModel: loading the core first makes `import captioning.config` work on its own.
import paradiffusion.config  # noqa: F401, E402
