"""Offline sensitivity analysis behind ``layerwise analyze``, one concept per module.

``devices``     ``--device`` and ``--dtype`` into torch objects that exist on this machine;
``loading``     the user's model, data and loss factories, checked before any estimate;
``checkpoint``  safe checkpoint loading (``weights_only=True``), key matching, finite weights;
``default``     the bundled default: the digits MLP of :mod:`layerwise.experiments.tasks`, briefly
trained;
``groups``      ``--groups`` strategies and ``--groups-file`` pattern tables;
``suggest``     the multipliers a policy's controller would assign, with its bounds;
``outputs``     the output-folder policy and the CSV/JSON writers (atomic, strict JSON);
``plots``       the PNG figures; ``table`` the summary table (rich on a terminal, else plain);
``pipeline``    the steps in order, which :mod:`layerwise.experiments.commands.analyze` chains.
"""
