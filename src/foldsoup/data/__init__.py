"""Datasets decoded into one prepared file (digits, CIFAR-10, ImageFolder, MedMNIST) and the stratified folds."""
