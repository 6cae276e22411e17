"""Great Expectations validation of the records table (see `medmat.validate.suite`)."""

from medmat.validate.checks import CHECKS, CRITICAL, WARNING, ValidateParams
from medmat.validate.suite import summary_lines, validate_records, write_report

__all__ = ["CHECKS", "CRITICAL", "WARNING", "ValidateParams", "summary_lines", "validate_records", "write_report"]
