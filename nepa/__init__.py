"""What the NEPA entry points share: arguments, data, optimisation, EMA, metrics and the Trainer."""
