"""ParaImage-Small: pick candidate images, hand them to annotators (Label Studio), take their
descriptions back as append-only versions, review them and export the approved set for stage 3.

Modules: ``config`` (the ``select_small`` and ``annotations`` sections), ``select`` (candidates by
aesthetic score, resolution and k-means diversity), ``labelstudio`` (tasks, labeling config and
parsing of exports), ``annotations`` (the versioned store, review states, guideline checks,
status and the approved export), ``cli`` (the commands).
"""
