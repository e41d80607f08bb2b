"""Internal modules of the disclosure-control engine; the public surface is :mod:`linkage.disclose.stage`.

* :mod:`~linkage.sdc.spec` - table, dimension and measure declarations;
* :mod:`~linkage.sdc.cells` - cell statistics from record-level contributions (DuckDB SQL);
* :mod:`~linkage.sdc.rules` - primary rules: threshold, zeros, dominance, p%, dof, percentiles;
* :mod:`~linkage.sdc.lp` - margin equations, the linear-programming audit and secondary suppression;
* :mod:`~linkage.sdc.perturb` - record keys, cell keys, p-tables and rounding;
* :mod:`~linkage.sdc.publish` - long-form output, data dictionaries and the auditors' report;
* :mod:`~linkage.sdc.standard` - the standard tables built from ``research/``.
"""
