"""Datasets decoded into one prepared file (digits, CIFAR-10, ImageFolder, MedMNIST, a manifest CSV) and the stratified (group-disjoint) folds."""
