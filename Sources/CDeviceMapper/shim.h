#ifndef GUARD_CDEVICEMAPPER_SHIM_H
#define GUARD_CDEVICEMAPPER_SHIM_H
#include <libdevmapper.h>
#endif
