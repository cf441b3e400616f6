"""Fitting methods: each drives rounds of requests to the sites and builds a FitResult."""
