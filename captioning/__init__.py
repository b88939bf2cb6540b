"""Captioning: paragraph captions for the kept set with vision-language models (`make caption`),
and ParaImage-Small selection and annotation (``captioning.small``)."""
