"""The equation-by-equation walkthrough (walkthrough.md) and the script that draws its figures."""
