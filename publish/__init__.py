"""`paradiffusion publish`: ParaImage-Big / ParaImage-Small as a Hugging Face dataset folder."""
