from cbmflow.cli import main

main()
