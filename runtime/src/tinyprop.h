/* tinyprop.h in src/: the Arduino library layout puts only src/ on the include path; this
 * forwards to the one public header, include/tinyprop.h. */
#include "../include/tinyprop.h"
